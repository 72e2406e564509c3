//! Jinja templates (minijinja): `config.yml` rendered with the deploy context and
//! container templates rendered with the application context. At build time templates
//! are only checked: compiled, and rendered leniently to validate the YAML they yield.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Serde, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};

use crate::{Error, Result};

fn environment(undefined: UndefinedBehavior) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(undefined);
    // YAML and config files end with a newline; keep it.
    if let Ok(syntax) = SyntaxConfig::builder().keep_trailing_newline(true).build() {
        env.set_syntax(syntax);
    }
    env
}

fn template_error(file: &str, text: &str, e: &minijinja::Error) -> Error {
    let line = e.line().unwrap_or(1);
    let expr = e.range().and_then(|r| text.get(r)).map(str::trim);
    let (message, column) = match (e.kind(), expr) {
        (ErrorKind::UndefinedError, Some(expr)) => {
            let col = e.range().map(|r| text[..r.start].rfind('\n').map_or(r.start, |nl| r.start - nl - 1) + 1);
            (format!("undefined variable `{expr}`"), col.unwrap_or(1))
        }
        _ => {
            let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
            (format!("template error ({}){detail}", e.kind()), 1)
        }
    };
    Error::config(file, text, line, column, message, Some("the variables a template can use are listed in SPEC §6".into()))
}

/// The application context of one instance (SPEC §6), for container templates.
pub fn app_context(spec: &crate::agent::api::GroupSpec, index: u32) -> serde_json::Value {
    let mut ctx = serde_json::json!({
        "environment": spec.environment_name,
        "config": spec.config,
        "node": {"name": spec.node},
        "host": {"name": spec.host},
        "instance": {"index": index},
        "release": spec.release,
    });
    // `existing_release` stays undefined on a first deploy.
    if let (Some(x), Some(map)) = (&spec.existing_release, ctx.as_object_mut()) {
        map.insert("existing_release".into(), serde_json::json!(x));
    }
    ctx
}

/// Render every container template (path → text) with `ctx`; output paths drop a
/// `.jinja` suffix. Errors name `templates/PATH`.
pub fn render_templates(
    templates: &std::collections::BTreeMap<String, String>,
    ctx: &serde_json::Value,
) -> Result<Vec<(String, String)>> {
    templates
        .iter()
        .map(|(path, text)| {
            let out = render(&format!("templates/{path}"), text, ctx)?;
            Ok((path.strip_suffix(".jinja").unwrap_or(path).to_string(), out))
        })
        .collect()
}

/// Render `text` strictly: an undefined variable is an error naming the file.
pub fn render(file: &str, text: &str, ctx: &serde_json::Value) -> Result<String> {
    let env = environment(UndefinedBehavior::Strict);
    env.render_str(text, Value::from(Serde(ctx)))
        .map_err(|e| template_error(file, text, &e))
}

/// Build-time check: syntax errors fail; otherwise the text rendered with every
/// variable undefined (chainable), or `None` when that render cannot succeed without
/// real values (e.g. a filter that needs a number).
pub fn render_lenient(file: &str, text: &str) -> Result<Option<String>> {
    let env = environment(UndefinedBehavior::Chainable);
    match env.render_str(text, Value::from(Serde(serde_json::json!({})))) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::SyntaxError => Err(template_error(file, text, &e)),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_and_lenient() {
        let ctx = serde_json::json!({"services": {"db": {"port": 5}}});
        assert_eq!(
            render("c.yml", "p: {{ services.db.port }}\n", &ctx).unwrap(),
            "p: 5\n"
        );
        match render("c.yml", "a: 1\np: {{ nope.x }}\n", &ctx) {
            Err(Error::Config(c)) => assert_eq!((c.line, c.column, c.message.as_str()), (2, 7, "undefined variable `nope.x`")),
            other => panic!("{other:?}"),
        }
        match render("c.yml", "p: {{ services.db.nope }}\n", &ctx) {
            Err(Error::Config(c)) => assert_eq!(c.message, "undefined variable `services.db.nope`"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            render_lenient("c.yml", "p: {{ a.b.c }}\n")
                .unwrap()
                .as_deref(),
            Some("p: \n")
        );
        match render_lenient("c.yml", "a: 1\nb: {% if %}\n") {
            Err(Error::Config(c)) => assert_eq!((c.file.as_str(), c.line), ("c.yml", 2)),
            other => panic!("{other:?}"),
        }
    }
}
