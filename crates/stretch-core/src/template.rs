//! Jinja templates (minijinja): `config.yml` rendered with the deploy context and
//! container templates rendered with the application context. At build time templates
//! are only checked: compiled, and rendered leniently to validate the YAML they yield.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Serde, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};

use crate::{Error, Result};

/// The work one render may do (minijinja fuel: about one per instruction and per 64
/// bytes of data made). Real templates use thousands; this ends an endless loop in well
/// under a second and bounds what a template can allocate.
pub const FUEL: u64 = 3_000_000;

/// The largest output of one render. Configuration files are small; a template must
/// not fill the agent's memory or disk.
pub const MAX_OUTPUT: usize = 8 * 1024 * 1024;

fn environment(undefined: UndefinedBehavior) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(undefined);
    env.set_fuel(Some(FUEL));
    // YAML and config files end with a newline; keep it.
    if let Ok(syntax) = SyntaxConfig::builder().keep_trailing_newline(true).build() {
        env.set_syntax(syntax);
    }
    env
}

/// Output that refuses to grow past [`MAX_OUTPUT`].
#[derive(Default)]
struct Capped {
    buf: Vec<u8>,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > MAX_OUTPUT {
            self.over = true;
            return Err(std::io::Error::other("template output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Failure {
    Engine(minijinja::Error),
    TooLarge,
}

/// Compile and render `text` within the fuel and output bounds.
fn bounded(env: &Environment, text: &str, ctx: Value) -> std::result::Result<String, Failure> {
    let template = env.template_from_str(text).map_err(Failure::Engine)?;
    let mut out = Capped::default();
    match template.render_captured_to(ctx, &mut out) {
        // The engine writes whole `str`s and a refused write adds nothing: valid UTF-8.
        Ok(_) => Ok(String::from_utf8(out.buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())),
        Err(_) if out.over => Err(Failure::TooLarge),
        Err(e) => Err(Failure::Engine(e)),
    }
}

fn failure_error(file: &str, text: &str, f: &Failure) -> Error {
    match f {
        Failure::Engine(e) => template_error(file, text, e),
        Failure::TooLarge => Error::config(
            file,
            text,
            1,
            1,
            format!(
                "the template's output is larger than {} MiB",
                MAX_OUTPUT / (1024 * 1024)
            ),
            Some("templates make configuration files; is a loop running too long?".into()),
        ),
    }
}

fn template_error(file: &str, text: &str, e: &minijinja::Error) -> Error {
    let line = e.line().unwrap_or(1);
    if e.kind() == ErrorKind::OutOfFuel {
        return Error::config(
            file,
            text,
            line,
            1,
            format!("the template does too much work (over {FUEL} steps) and was stopped"),
            Some("a loop that is too long or never ends, or runaway recursion?".into()),
        );
    }
    let help = Some("config.yml sees `services`, `environment`, `release` and `existing_release`; container templates see `environment`, `config`, `node`, `host`, `instance`, `release` and `existing_release`".to_string());
    // The error's range covers the failing lookup (`.missing`); widen it to the whole
    // dotted name so the message says which variable.
    let widened = e
        .range()
        .filter(|r| text.get(r.clone()).is_some())
        .map(|r| {
            let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
            let start = text[..r.start]
                .rfind(|c: char| !is_name(c))
                .map_or(0, |i| i + 1);
            let end = text[r.end..]
                .find(|c: char| !is_name(c))
                .map_or(text.len(), |i| r.end + i);
            start..end
        });
    if let (ErrorKind::UndefinedError, Some(r)) = (e.kind(), widened) {
        let column = text[..r.start]
            .rfind('\n')
            .map_or(r.start, |nl| r.start - nl - 1)
            + 1;
        let message = format!("undefined variable `{}`", text[r].trim());
        return Error::config(file, text, line, column, message, help);
    }
    let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
    Error::config(
        file,
        text,
        line,
        1,
        format!("template error ({}){detail}", e.kind()),
        help,
    )
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
    render_value(file, text, Value::from(Serde(ctx)))
}

/// [`render`] with a context built by [`deploy_context`].
pub fn render_value(file: &str, text: &str, ctx: Value) -> Result<String> {
    let env = environment(UndefinedBehavior::Strict);
    bounded(&env, text, ctx).map_err(|f| failure_error(file, text, &f))
}

/// `environment` in the deploy context: renders as its name, and has `.name`,
/// `.hosts` and `.groups`.
#[derive(Debug)]
struct EnvironmentObject {
    name: String,
    fields: Value,
}

impl minijinja::value::Object for EnvironmentObject {
    fn repr(self: &std::sync::Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Plain
    }

    fn get_value(self: &std::sync::Arc<Self>, key: &Value) -> Option<Value> {
        self.fields.get_item(key).ok().filter(|v| !v.is_undefined())
    }

    fn render(self: &std::sync::Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// The deploy context for `config.yml`: `services`, `environment`
/// (`{name, hosts, groups}`, rendering as its name), `release` and, unless this is a
/// first deploy, `existing_release`.
pub fn deploy_context(
    environment: &serde_json::Value,
    services: &serde_json::Value,
    release: &serde_json::Value,
    existing_release: Option<&serde_json::Value>,
) -> Value {
    let name = environment
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_string();
    let env = Value::from_object(EnvironmentObject {
        name,
        fields: Value::from(Serde(environment)),
    });
    let mut map: std::collections::BTreeMap<String, Value> = std::collections::BTreeMap::new();
    map.insert("environment".into(), env);
    map.insert("services".into(), Value::from(Serde(services)));
    map.insert("release".into(), Value::from(Serde(release)));
    if let Some(x) = existing_release {
        map.insert("existing_release".into(), Value::from(Serde(x)));
    }
    Value::from(map)
}

/// Build-time check: syntax errors fail; otherwise the text rendered with every
/// variable undefined (chainable), or `None` when that render cannot succeed without
/// real values (e.g. a filter that needs a number). Running out of fuel or past the
/// output cap fails too: a runaway template is refused before it reaches a deploy.
pub fn render_lenient(file: &str, text: &str) -> Result<Option<String>> {
    let env = environment(UndefinedBehavior::Chainable);
    match bounded(&env, text, Value::from(Serde(serde_json::json!({})))) {
        Ok(s) => Ok(Some(s)),
        Err(Failure::Engine(e))
            if !matches!(e.kind(), ErrorKind::SyntaxError | ErrorKind::OutOfFuel) =>
        {
            Ok(None)
        }
        Err(f) => Err(failure_error(file, text, &f)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_error(r: Result<impl std::fmt::Debug>) -> crate::error::ConfigError {
        match r {
            Err(Error::Config(c)) => *c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn endless_loops_run_out_of_fuel() {
        let ctx = serde_json::json!({});
        let looping = "a: 1\n{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\n";
        let start = std::time::Instant::now();
        let c = config_error(render("templates/loop.conf.jinja", looping, &ctx));
        assert_eq!((c.file.as_str(), c.line), ("templates/loop.conf.jinja", 2));
        assert!(c.message.contains("too much work"), "{}", c.message);
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        // Exponential recursion within the recursion limit: stopped by fuel too.
        let recursive = "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}";
        let c = config_error(render("c.yml", recursive, &ctx));
        assert!(c.message.contains("too much work"), "{}", c.message);
        // Endless recursion: the engine's recursion limit, still an error naming the file.
        let endless = "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}";
        assert_eq!(config_error(render("c.yml", endless, &ctx)).file, "c.yml");
        // The build-time check refuses it as well.
        let c = config_error(render_lenient("config.yml", looping));
        assert!(c.message.contains("too much work"), "{}", c.message);
    }

    #[test]
    fn output_is_capped() {
        let ctx = serde_json::json!({});
        // 9 MiB in 1 KiB lines: little work, too much output.
        let big = "{% for i in range(9216) %}{{ 'x' * 1023 }}\n{% endfor %}";
        let c = config_error(render("templates/big.txt.jinja", big, &ctx));
        assert_eq!(c.file, "templates/big.txt.jinja");
        assert!(c.message.contains("larger than 8 MiB"), "{}", c.message);
        assert!(render_lenient("config.yml", big).is_err());
        // Just under the cap is fine.
        let fits = "{% for i in range(8000) %}{{ 'x' * 1023 }}\n{% endfor %}";
        assert_eq!(render("c", fits, &ctx).unwrap().len(), 8000 * 1024);
    }

    #[test]
    fn environment_renders_as_its_name() {
        let env = serde_json::json!({"name": "prod", "hosts": {"a": {}}, "groups": {}});
        let ctx = deploy_context(
            &env,
            &serde_json::json!({}),
            &serde_json::json!({"id": "x"}),
            None,
        );
        let out = render_value(
            "c",
            "{{ environment }} {{ environment.name }} {{ environment.hosts | length }} {{ release.id }}",
            ctx.clone(),
        );
        assert_eq!(out.unwrap(), "prod prod 1 x");
        assert!(render_value("c", "{{ existing_release.id }}", ctx).is_err());
    }

    #[test]
    fn strict_and_lenient() {
        let ctx = serde_json::json!({"services": {"db": {"port": 5}}});
        assert_eq!(
            render("c.yml", "p: {{ services.db.port }}\n", &ctx).unwrap(),
            "p: 5\n"
        );
        match render("c.yml", "a: 1\np: {{ nope.x }}\n", &ctx) {
            Err(Error::Config(c)) => assert_eq!(
                (c.line, c.column, c.message.as_str()),
                (2, 7, "undefined variable `nope.x`")
            ),
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
