//! The JSON API under `/api/` (described by `openapi.json`, served at
//! `/api/openapi.json`), and the log stream: `GET /api/runs/{id}/logs?follow=1` sends
//! Server-Sent Events (see `feed`).

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use stretch_core::Error;
use stretch_core::deploy::Kind;
use stretch_core::error::{ErrorBody, ErrorKind};
use stretch_core::store::RunKind;

use super::jobs::{self, Started};
use super::{Shared, view};

/// An error answer: the core's [`ErrorBody`] (`kind`, `stage`, `message`, `help`),
/// with a status that follows its kind, plus `error` (the one-line text clients read
/// before `kind` existed) and, for 409, `holder`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// For 409: who holds the environment's lock and since when.
    pub holder: Option<Box<serde_json::Value>>,
}

/// The status that answers an error of `kind`.
fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Busy => StatusCode::CONFLICT,
        ErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ApiError {
    /// The one-line text of the answer's `error`: a busy environment's message alone
    /// (as it always was), otherwise the error as the CLI prints it.
    pub fn text(&self) -> String {
        match self.body.kind {
            ErrorKind::Busy => self.body.message.clone(),
            _ => self.body.text(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let body = ErrorBody::from(&e);
        ApiError {
            status: status_of(body.kind),
            body,
            holder: None,
        }
    }
}

/// What an error answer carries.
#[derive(Serialize)]
struct Answer<'a> {
    #[serde(flatten)]
    body: &'a ErrorBody,
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    holder: Option<&'a serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let answer = Answer {
            body: &self.body,
            error: self.text(),
            holder: self.holder.as_deref(),
        };
        (self.status, Json(answer)).into_response()
    }
}

/// An answer that is not the core's error (authentication, the router): bad input,
/// or not found for a 404.
pub fn error_body(status: StatusCode, message: &str, help: Option<&str>) -> Response {
    let kind = if status == StatusCode::NOT_FOUND {
        ErrorKind::NotFound
    } else {
        ErrorKind::Invalid
    };
    ApiError {
        status,
        body: ErrorBody {
            kind,
            stage: None,
            message: message.to_string(),
            help: help.map(String::from),
            at: None,
        },
        holder: None,
    }
    .into_response()
}

type ApiResult<T = Json<serde_json::Value>> = Result<T, ApiError>;

pub async fn not_found() -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        "no such page or endpoint",
        Some("`/api/openapi.json` lists the API"),
    )
}

pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

/// The system: releases and environments (with per-host health).
pub async fn system(State(st): State<Shared>) -> ApiResult {
    let system = st.system()?;
    let releases: Vec<_> = st
        .reader
        .releases()?
        .iter()
        .map(view::release_json)
        .collect();
    let environments = view::environments(&system, &st.home, &st.reader, true).await?;
    Ok(Json(json!({
        "system": system.name(),
        "registry": system.spec.registry,
        "sources": system.sources.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        "releases": releases,
        "environments": environments,
    })))
}

pub async fn releases(State(st): State<Shared>) -> ApiResult {
    Ok(Json(json!(stretch_core::outcome::releases(&st.reader)?)))
}

pub async fn release(State(st): State<Shared>, Path(key): Path<String>) -> ApiResult {
    Ok(Json(view::release_json(&st.reader.find_release(&key)?)))
}

pub async fn environments(State(st): State<Shared>) -> ApiResult {
    let system = st.system()?;
    Ok(Json(json!(
        view::environments(&system, &st.home, &st.reader, true).await?
    )))
}

pub async fn environment(State(st): State<Shared>, Path(env): Path<String>) -> ApiResult {
    let system = st.system()?;
    Ok(Json(json!(
        view::environment(&system, &st.home, &st.reader, &env, true).await?
    )))
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    environment: Option<String>,
    limit: Option<usize>,
}

pub async fn history(State(st): State<Shared>, Query(q): Query<HistoryQuery>) -> ApiResult {
    let mut runs = st.reader.runs(q.environment.as_deref())?;
    if let Some(n) = q.limit {
        runs.truncate(n);
    }
    Ok(Json(json!(runs)))
}

fn unknown_run(id: i64) -> ApiError {
    Error::unknown_run(id).into()
}

/// One run with its timeline and whole log. A build that turned out to be bad input
/// is not in the history; the server still says why, to whoever started it.
#[derive(serde::Serialize)]
struct RunDetail<'a> {
    #[serde(flatten)]
    run: serde_json::Value,
    log: &'a [stretch_core::store::LogLine],
}

pub async fn run(State(st): State<Shared>, Path(id): Path<i64>) -> ApiResult<Response> {
    match st.reader.run(id)? {
        Some(run) => {
            let lines = st.reader.log(id, 0)?;
            let run = view::run_json(&run, &lines, st.jobs.outcome(id).as_ref());
            // Serialized straight from the lines: a long log never becomes a JSON tree.
            Ok(Json(RunDetail { run, log: &lines }).into_response())
        }
        None => match st.jobs.outcome(id) {
            Some(o) => Ok(Json(json!({
                "id": id, "kind": RunKind::Build, "status": o.status, "error": o.error, "help": o.help,
                "failure": o.failure, "stages": [], "log": [],
            })).into_response()),
            None => Err(unknown_run(id)),
        },
    }
}

#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    follow: Option<String>,
    after: Option<i64>,
}

/// A run's log lines after `after` (JSON), or with `follow=1` the lines as they come
/// (SSE: `line` events with `id` = seq, then one `end` event with the run's status).
pub async fn logs(
    State(st): State<Shared>,
    Path(id): Path<i64>,
    Query(q): Query<LogsQuery>,
    headers: HeaderMap,
) -> Response {
    let known = match st.reader.run(id) {
        Ok(r) => r.is_some() || st.jobs.outcome(id).is_some(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    if !known {
        return unknown_run(id).into_response();
    }
    // A reconnecting EventSource says where it stopped.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let after = resume.or(q.after).unwrap_or(0);
    let follow = q.follow.as_deref().is_some_and(|f| f == "1" || f == "true");
    if !follow {
        return match st.reader.log(id, after) {
            Ok(lines) => Json(lines).into_response(),
            Err(e) => ApiError::from(e).into_response(),
        };
    }
    super::feed::follow(&st, id, after)
}

/// The answer to a started job: 202 with the run, or 200 when it ended at once.
fn started(s: Started) -> Response {
    match s {
        Started::Run(run) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "run": run,
                "status": "running",
                "links": {
                    "run": format!("/api/runs/{run}"),
                    "log": format!("/api/runs/{run}/logs?follow=1"),
                    "page": format!("/runs/{run}"),
                },
            })),
        )
            .into_response(),
        Started::Done(body) => (StatusCode::OK, Json(body)).into_response(),
    }
}

/// A JSON body, or the defaults for an empty one.
fn body<T: serde::de::DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid(format!("bad request body: {e}")).into())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildBody {
    /// Git refs to build instead of the system file's, by source name.
    #[serde(default)]
    sources: BTreeMap<String, String>,
}

pub async fn build(State(st): State<Shared>, bytes: Bytes) -> Response {
    let b = match body::<BuildBody>(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match jobs::start_build(&st, &b.sources).await {
        Ok(s) => started(s),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    release: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    #[serde(default)]
    dry_run: bool,
}

/// A 409 with who holds the environment's lock (from its lock file).
pub fn with_holder(st: &Shared, env: &str, mut e: ApiError) -> ApiError {
    if e.body.kind == ErrorKind::Busy {
        let path = st.home.root.join("locks").join(format!("{env}.lock"));
        e.holder = std::fs::read(path)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .map(Box::new);
    }
    e
}

async fn deploy_kind(st: Shared, env: String, bytes: Bytes, kind: Kind) -> Response {
    let req = match body::<DeployBody>(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match jobs::start_deploy(&st, &env, req.release, kind).await {
        Ok(s) => started(s),
        Err(e) => with_holder(&st, &env, e.into()).into_response(),
    }
}

pub async fn deploy(State(st): State<Shared>, Path(env): Path<String>, bytes: Bytes) -> Response {
    deploy_kind(st, env, bytes, Kind::Deploy).await
}

pub async fn rollback(State(st): State<Shared>, Path(env): Path<String>, bytes: Bytes) -> Response {
    deploy_kind(st, env, bytes, Kind::Rollback).await
}

pub async fn apply(State(st): State<Shared>, Path(env): Path<String>, bytes: Bytes) -> Response {
    let req = match body::<ApplyBody>(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match jobs::start_apply(&st, &env, req.dry_run).await {
        Ok(s) => started(s),
        Err(e) => with_holder(&st, &env, e.into()).into_response(),
    }
}
