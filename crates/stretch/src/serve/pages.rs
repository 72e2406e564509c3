//! The web view: server-rendered HTML (minijinja templates, HTML-escaped by default)
//! and one small plain script that follows a running build or deploy's log with
//! EventSource. Buttons are plain forms carrying the session's CSRF token.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use minijinja::value::{Serde, Value};
use minijinja::{Environment, context};
use serde::Deserialize;
use stretch_core::deploy::Kind;
use stretch_core::store::RunStatus;
use stretch_core::{Error, Result};

use super::api::{ApiError, with_holder};
use super::auth::{COOKIE, Caller, same_origin, session_cookie};
use super::jobs::{self, Started};
use super::{Shared, view};

/// The run page shows at most this many lines (the API has them all).
const PAGE_LINES: usize = 10_000;

pub struct Pages {
    env: Environment<'static>,
}

impl Pages {
    pub fn new() -> Result<Pages> {
        let mut env = Environment::new();
        for (name, text) in [
            ("base.html", include_str!("templates/base.html")),
            ("login.html", include_str!("templates/login.html")),
            ("system.html", include_str!("templates/system.html")),
            ("run.html", include_str!("templates/run.html")),
            ("error.html", include_str!("templates/error.html")),
        ] {
            env.add_template(name, text)
                .map_err(|e| Error::failed("serve", format!("template `{name}`: {e}")))?;
        }
        env.add_filter("when", |s: String| {
            s.replace('T', " ").chars().take(19).collect::<String>()
        });
        env.add_filter("short", |s: String| s.chars().take(10).collect::<String>());
        Ok(Pages { env })
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Html<String> {
        match self.env.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(html) => Html(html),
            // A template bug: say so plainly (escaped) rather than serve half a page.
            Err(e) => Html(format!(
                "<p>page error: {}</p>",
                minijinja::HtmlEscape(&e.to_string())
            )),
        }
    }

    pub fn login(&self, error: Option<&str>) -> Html<String> {
        self.render("login.html", context! { error })
    }

    fn error(&self, status: StatusCode, message: &str, help: Option<&str>) -> Response {
        (
            status,
            self.render(
                "error.html",
                context! { status => status.as_u16(), message, help },
            ),
        )
            .into_response()
    }

    fn api_error(&self, e: ApiError) -> Response {
        let holder = e.holder.as_ref().map(|h| h.to_string());
        let help = e.body.help.clone().or(holder);
        self.error(e.status, &e.text(), help.as_deref())
    }
}

pub async fn login_form(State(st): State<Shared>, headers: HeaderMap) -> Response {
    if st.auth.caller(&headers).is_some() {
        return Redirect::to("/").into_response();
    }
    st.pages.login(None).into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

pub async fn login(
    State(st): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-site request refused").into_response();
    }
    let ip = peer.ip().to_canonical();
    if !st.auth.token_ok(form.token.trim()) {
        st.auth.failed(ip).await;
        return (
            StatusCode::UNAUTHORIZED,
            st.pages.login(Some("wrong token")),
        )
            .into_response();
    }
    st.auth.succeeded(ip);
    let Some(id) = st.auth.new_session() else {
        return st.pages.error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot make a session",
            None,
        );
    };
    let mut resp = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("{COOKIE}={id}; {}", st.auth.cookie_attributes()))
    {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub async fn logout(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if !caller.form_ok(&form.csrf) {
        return st
            .pages
            .error(StatusCode::FORBIDDEN, "missing or wrong CSRF token", None);
    }
    if let Some(id) = session_cookie(&headers) {
        st.auth.end_session(&id);
    }
    let mut resp = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}=; {}; Max-Age=0",
        st.auth.cookie_attributes()
    )) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// The system view: actions, environments with health, releases, history.
pub async fn system(State(st): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    match system_page(&st, &caller).await {
        Ok(html) => html.into_response(),
        Err(e) => st.pages.api_error(e.into()),
    }
}

async fn system_page(st: &Shared, caller: &Caller) -> Result<Html<String>> {
    let system = st.system()?;
    let releases = st.reader.releases()?;
    let names: HashMap<&str, &str> = releases
        .iter()
        .map(|r| (r.id.as_str(), r.name.as_str()))
        .collect();
    let environments = view::environments(&system, &st.home, &st.reader, true).await?;
    let mut history = st.reader.runs(None)?;
    history.truncate(50);
    let history: Vec<_> = history
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["release_name"] = r
                .release
                .as_deref()
                .and_then(|id| names.get(id))
                .map(|n| n.to_string())
                .into();
            v
        })
        .collect();
    let releases: Vec<_> = releases.iter().map(view::release_json).collect();
    Ok(st.pages.render(
        "system.html",
        context! {
            system => system.name(),
            registry => system.spec.registry,
            releases => Value::from(Serde(&releases)),
            environments => Value::from(Serde(&environments)),
            history => Value::from(Serde(&history)),
            csrf => caller.csrf(),
        },
    ))
}

/// One run: its stage timeline and log; a running one follows its log live.
pub async fn run(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<i64>,
) -> Response {
    let record = match st.reader.run(id) {
        Ok(r) => r,
        Err(e) => return st.pages.api_error(e.into()),
    };
    let Some(record) = record else {
        if let Some(o) = st.jobs.outcome(id) {
            let msg = format!(
                "run {id} was bad input and recorded nothing: {}",
                o.error.unwrap_or_default()
            );
            return st
                .pages
                .error(StatusCode::BAD_REQUEST, &msg, o.help.as_deref());
        }
        return st.pages.error(
            StatusCode::NOT_FOUND,
            &format!("unknown run `{id}`"),
            Some("the history on the main page lists the runs"),
        );
    };
    let lines = match st.reader.log(id, 0) {
        Ok(l) => l,
        Err(e) => return st.pages.api_error(e.into()),
    };
    let info = view::run_json(&record, &lines, st.jobs.outcome(id).as_ref());
    let after = lines.last().map(|l| l.seq).unwrap_or(0);
    let skipped = lines.len().saturating_sub(PAGE_LINES);
    let release_name = record
        .release
        .as_deref()
        .and_then(|r| st.reader.release_by_id(r).ok().flatten())
        .map(|r| r.name);
    st.pages
        .render(
            "run.html",
            context! {
                run => Value::from(Serde(&info)),
                release_name,
                lines => Value::from(Serde(&lines[skipped..])),
                skipped,
                after,
                running => record.status == RunStatus::Running,
                csrf => caller.csrf(),
            },
        )
        .into_response()
}

#[derive(Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    release: String,
    /// `NAME=REF` pairs, separated by spaces or commas (builds only).
    #[serde(default)]
    sources: String,
}

/// The page's buttons: start a build, deploy, rollback or apply, then show its run.
pub async fn action(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(action): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if !caller.form_ok(&form.csrf) {
        return st.pages.error(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token",
            Some("reload the page and try again"),
        );
    }
    let env = form.environment.trim().to_string();
    let release = Some(form.release.trim().to_string()).filter(|r| !r.is_empty());
    let started = match action.as_str() {
        "build" => match parse_sources(&form.sources) {
            Ok(s) => jobs::start_build(&st, &s).await,
            Err(e) => Err(e),
        },
        "deploy" => jobs::start_deploy(&st, &env, release, Kind::Deploy).await,
        "rollback" => jobs::start_deploy(&st, &env, release, Kind::Rollback).await,
        "apply" => jobs::start_apply(&st, &env, false).await,
        other => {
            return st.pages.error(
                StatusCode::NOT_FOUND,
                &format!("unknown action `{other}`"),
                None,
            );
        }
    };
    match started {
        Ok(Started::Run(run)) => Redirect::to(&format!("/runs/{run}")).into_response(),
        Ok(Started::Done(body)) => {
            let note = body["note"].as_str().unwrap_or("nothing to do").to_string();
            st.pages.error(StatusCode::OK, &note, None)
        }
        Err(e) => st.pages.api_error(with_holder(&st, &env, e.into())),
    }
}

fn parse_sources(text: &str) -> Result<BTreeMap<String, String>> {
    text.split([' ', ',', '\n'])
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .split_once('=')
                .filter(|(n, r)| !n.is_empty() && !r.is_empty())
                .map(|(n, r)| (n.to_string(), r.to_string()))
                .ok_or_else(|| Error::invalid(format!("`{s}`: expected `NAME=REF`")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_they_show() {
        let pages = Pages::new().unwrap();
        let evil = "<script>alert(1)</script>";
        let run = serde_json::json!({
            "id": 7, "kind": "build", "status": "running", "started_at": "2026-01-01T00:00:00.000Z",
            "release": evil, "error": null, "stages": [{"name": evil, "status": "running", "elapsed": null, "started_at": ""}],
        });
        let lines = [stretch_core::store::LogLine {
            seq: 1,
            at: "2026-01-01T00:00:00.000Z".into(),
            stage: evil.into(),
            text: evil.into(),
            event: None,
        }];
        let html = pages.render(
            "run.html",
            context! { run => Value::from(Serde(&run)), lines => Value::from(Serde(&lines[..])), skipped => 0, after => 1, running => true, csrf => evil },
        );
        assert!(!html.0.contains(evil), "{}", html.0);
        assert!(
            html.0
                .contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{}",
            html.0
        );
        assert!(html.0.contains("data-running=\"true\""));
        assert!(pages.login(Some(evil)).0.contains("&lt;script&gt;"));
    }

    #[test]
    fn build_sources() {
        let s = parse_sources("app=v1, lib=main").unwrap();
        assert_eq!(s.get("app").map(String::as_str), Some("v1"));
        assert!(parse_sources("app").is_err());
        assert!(parse_sources("").unwrap().is_empty());
    }
}
