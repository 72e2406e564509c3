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
    let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
    let message = format!("template error ({}){detail}", e.kind());
    Error::config(file, text, line, 1, message, None)
}

/// Render `text` strictly: an undefined variable is an error naming the file.
pub fn render(file: &str, text: &str, ctx: &serde_json::Value) -> Result<String> {
    let env = environment(UndefinedBehavior::Strict);
    env.render_str(text, Value::from(Serde(ctx))).map_err(|e| template_error(file, text, &e))
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
        assert_eq!(render("c.yml", "p: {{ services.db.port }}\n", &ctx).unwrap(), "p: 5\n");
        assert!(render("c.yml", "p: {{ nope.x }}\n", &ctx).is_err());
        assert_eq!(render_lenient("c.yml", "p: {{ a.b.c }}\n").unwrap().as_deref(), Some("p: \n"));
        match render_lenient("c.yml", "a: 1\nb: {% if %}\n") {
            Err(Error::Config(c)) => assert_eq!((c.file.as_str(), c.line), ("c.yml", 2)),
            other => panic!("{other:?}"),
        }
    }
}
