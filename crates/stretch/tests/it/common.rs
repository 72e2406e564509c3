//! The test context: a temp folder holding a system, and a way to run `stretch` in it.

use std::path::{Path, PathBuf};
use std::process::Command;

pub use stretch_test::{base_image, git, git_commit_all, git_init, unique, write};

/// What one run of the binary did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success:\n{self}");
        self
    }

    /// Assert a failure with `code` whose stderr contains every one of `needles`.
    #[track_caller]
    pub fn fails(self, code: i32, needles: &[&str]) -> Self {
        assert_eq!(self.code, code, "expected exit {code}:\n{self}");
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}:\n{self}");
        }
        self
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A temp folder with a `system.yml` (written by the test) and a home inside it.
pub struct Ctx {
    pub dir: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx {
            dir: tempfile::tempdir().expect("temp dir"),
            env: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn home(&self) -> PathBuf {
        self.path().join(".stretch")
    }

    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        write(self.path(), rel, contents)
    }

    /// Run `stretch ARGS` in the folder.
    pub fn run(&self, args: &[&str]) -> Out {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stretch"));
        cmd.args(args)
            .current_dir(self.path())
            .env_remove("STRETCH_HOME")
            .env_remove("STRETCH_IDENTITY");
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run stretch");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Nothing was recorded: no release, no history.
    #[track_caller]
    pub fn assert_nothing_recorded(&self) {
        let releases = self.run(&["releases", "--json"]).ok().json();
        assert_eq!(releases, serde_json::json!([]), "releases were recorded");
        let history = self.run(&["history", "--json"]).ok().json();
        assert_eq!(history, serde_json::json!([]), "history was recorded");
        let left: Vec<_> = std::fs::read_dir(self.home().join("releases"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "files left in releases/: {left:?}");
    }

    /// No release was recorded (a failed stage is in the history, with its log).
    #[track_caller]
    pub fn assert_no_release(&self) {
        let releases = self.run(&["releases", "--json"]).ok().json();
        assert_eq!(releases, serde_json::json!([]), "releases were recorded");
        let left: Vec<_> = std::fs::read_dir(self.home().join("releases"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "files left in releases/: {left:?}");
    }

    /// A one-node system at the root of a `path` source, with the test base image.
    pub fn one_node(&self, system: &str, registry: &str) {
        self.write(
            "system.yml",
            format!("system: {system}\nregistry: {registry}\nsources:\n  - path: ./app\n"),
        );
        self.write("app/stretch.yml", "name: web\n");
        self.write(
            "app/Dockerfile",
            format!("FROM {}\nCOPY . /app\n", base_image()),
        );
    }
}

/// Remove every image of a test's system when the test ends, pass or fail.
pub fn image_cleanup(system: &str) -> stretch_test::PrefixGuard {
    stretch_test::PrefixGuard(format!("{system}/"))
}
