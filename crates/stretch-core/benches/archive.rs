//! Benchmark of the release archive against `tar -cf - DIR | zstd -T0 -3` on the same tree.
//!
//! Generates (once, cached under `target/bench-data/`) a tree of STRETCH_BENCH_FILES files
//! (default 10,000) holding STRETCH_BENCH_MB megabytes (default 1024), half random bytes
//! and half log-like text, then times each side STRETCH_BENCH_RUNS times (default 3),
//! interleaved, and prints medians of wall and CPU time, throughput, output sizes and
//! peak RSS.
//!
//! Run: `cargo bench -p stretch-core --bench archive`
//! (quick: `STRETCH_BENCH_MB=64 STRETCH_BENCH_FILES=1000 cargo bench -p stretch-core --bench archive`)

// A benchmark panics loudly on any failure; that is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use stretch_core::release::archive::{hash_tree, write_archive};

const MB: u64 = 1 << 20;

fn main() {
    let mb: u64 = env_or("STRETCH_BENCH_MB", 1024);
    let files: u64 = env_or("STRETCH_BENCH_FILES", 10_000);
    let runs = env_or("STRETCH_BENCH_RUNS", 3).max(1) as usize;
    let data = bench_dir().join("bench-data");
    let tree = ensure_tree(&data, mb, files);
    let out_dir = data.join("out");
    fs::create_dir_all(&out_dir).unwrap();
    let ours_out = out_dir.join("stretch.index");
    let ours_store = out_dir.join("chunks");
    let theirs_out = out_dir.join("tar-zstd.tar.zst");
    let no_skip = |_: &Path| false;

    // Warm the page cache so neither side pays for cold reads; also times hashing alone.
    let _ = hash_tree(&tree, &no_skip).unwrap();
    let mut hashing = Runs::default();
    for _ in 0..runs {
        let (t, cpu) = (Instant::now(), cpu_secs());
        std::hint::black_box(hash_tree(&tree, &no_skip).unwrap());
        hashing.wall.push(t.elapsed().as_secs_f64());
        hashing.cpu.push(cpu_secs() - cpu);
    }

    let has_zstd = Command::new("zstd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let time_bin = Path::new("/usr/bin/time").exists();
    let (mut ours, mut theirs) = (Runs::default(), Runs::default());
    let mut bytes = 0;
    let script = format!(
        "tar -cf - -C '{}' tree | zstd -T0 -3 -q -o '{}'",
        tree.parent().unwrap().display(),
        theirs_out.display()
    );
    for round in 0..runs {
        // Alternate who goes first, so neither side always inherits the other's effects.
        for ours_turn in [round % 2 == 0, round % 2 == 1] {
            if ours_turn {
                // Cold: an empty chunk store, no stat cache.
                let _ = fs::remove_file(&ours_out);
                let _ = fs::remove_dir_all(&ours_store);
                let (t, cpu) = (Instant::now(), cpu_secs());
                let d = write_archive(&tree, None, &ours_store, &ours_out, &no_skip, None).unwrap();
                ours.wall.push(t.elapsed().as_secs_f64());
                ours.cpu.push(cpu_secs() - cpu);
                bytes = d.digest.bytes;
            } else if has_zstd {
                let _ = fs::remove_file(&theirs_out);
                theirs.run(&script, time_bin);
                // tar | zstd does not fsync: flush its output untimed, so its writeback
                // does not compete with the next run's.
                File::open(&theirs_out).unwrap().sync_all().unwrap();
            }
        }
    }
    ours.rss_kb = vm_hwm_kb();

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let content_mb = bytes as f64 / MB as f64;
    println!();
    println!(
        "tree: {files} files, {content_mb:.0} MB of content ({}), {cores} cores",
        tree.display()
    );
    println!(
        "median of {runs} interleaved runs (order alternating); load average {}",
        load.split_whitespace().next().unwrap_or("?")
    );
    println!(
        "{:<30} {:>8} {:>7} {:>7} {:>10} {:>12}",
        "", "wall s", "MB/s", "CPU s", "output MB", "peak RSS MB"
    );
    let mb = |b: u64| format!("{:.1}", b as f64 / MB as f64);
    let row = |name: &str, r: &mut Runs, out: Option<u64>| {
        let wall = median(&mut r.wall);
        let cpu = if r.cpu.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", median(&mut r.cpu))
        };
        let size = out.map_or("-".to_string(), mb);
        let rss = if r.rss_kb == 0 {
            "-".to_string()
        } else {
            mb(r.rss_kb * 1024)
        };
        println!(
            "{name:<30} {wall:>8.3} {:>7.0} {cpu:>7} {size:>10} {rss:>12}",
            content_mb / wall
        );
    };
    row(
        "stretch write_archive",
        &mut ours,
        Some(tree_size(&ours_store)),
    );
    if has_zstd {
        row(
            "tar -cf - | zstd -T0 -3",
            &mut theirs,
            fs::metadata(&theirs_out).ok().map(|m| m.len()),
        );
    } else {
        println!("tar | zstd: skipped, no `zstd` command (apt-get install -y zstd)");
    }
    row("stretch hash_tree (no output)", &mut hashing, None);
    println!("MB/s: content MB / wall s. CPU s: user + system of all threads and processes.");
    println!(
        "Our peak RSS is this process's VmHWM (hash_tree runs included); theirs the largest of tar, zstd."
    );
}

/// Total size of the files under `dir` (the chunk store).
fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return fs::metadata(dir).map_or(0, |m| m.len());
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                tree_size(&p)
            } else {
                fs::metadata(&p).map_or(0, |m| m.len())
            }
        })
        .sum()
}

#[derive(Default)]
struct Runs {
    wall: Vec<f64>,
    cpu: Vec<f64>,
    rss_kb: u64,
}

impl Runs {
    /// Time `sh -c script`, with CPU time and peak RSS from GNU time when available.
    fn run(&mut self, script: &str, time_bin: bool) {
        let mut cmd = if time_bin {
            let mut c = Command::new("/usr/bin/time");
            c.args(["-f", "stretch-bench %U %S %M", "sh", "-c", script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        };
        let t = Instant::now();
        let o = cmd.output().unwrap();
        self.wall.push(t.elapsed().as_secs_f64());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // GNU time: user and system seconds of sh, tar and zstd, and their largest RSS.
        let stderr = String::from_utf8_lossy(&o.stderr);
        if let Some(line) = stderr
            .lines()
            .find_map(|l| l.strip_prefix("stretch-bench "))
        {
            let f: Vec<f64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if let [user, sys, rss_kb] = f[..] {
                self.cpu.push(user + sys);
                self.rss_kb = self.rss_kb.max(rss_kb as u64);
            }
        }
    }
}

/// User + system CPU seconds used so far by this process, all threads included.
fn cpu_secs() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The cargo target folder: the bench runs as `target/<profile>/deps/archive-<hash>`.
fn bench_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// Peak resident set size of this process, in KiB.
fn vm_hwm_kb() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// xorshift64*: fast, seeded, so every machine generates the same tree.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The tree for (`mb`, `files`), generated unless a complete one is cached.
fn ensure_tree(data: &Path, mb: u64, files: u64) -> PathBuf {
    let base = data.join(format!("tree-{mb}mb-{files}f"));
    let tree = base.join("tree");
    let done = base.join("complete");
    if done.exists() {
        return tree;
    }
    eprintln!(
        "generating {mb} MB in {files} files under {} ...",
        tree.display()
    );
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&tree).unwrap();
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);

    // Log-uniform sizes from 256 B to 4 MiB (many small files, a few large), scaled to the
    // total; every 50th file is empty.
    let raw: Vec<f64> = (0..files)
        .map(|i| {
            let u = rng.below(1 << 20) as f64 / (1 << 20) as f64;
            if i % 50 == 49 {
                0.0
            } else {
                (256f64.ln() + u * 16384f64.ln()).exp()
            }
        })
        .collect();
    let scale = (mb * MB) as f64 / raw.iter().sum::<f64>();
    let (mut random_bytes, mut text_bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; MB as usize];
    for (i, r) in raw.iter().enumerate() {
        let size = (r * scale) as u64;
        let dir = tree.join(format!("d{:02}/s{}", i / 200, i % 7));
        fs::create_dir_all(&dir).unwrap();
        // Balance the two kinds by bytes, not by count.
        let random = random_bytes <= text_bytes;
        let path = dir.join(format!("f{i:05}.{}", if random { "bin" } else { "log" }));
        let mut w = BufWriter::with_capacity(MB as usize, File::create(&path).unwrap());
        let mut left = size;
        while left > 0 {
            let n = left.min(MB) as usize;
            if random {
                for c in buf[..n].chunks_mut(8) {
                    let x = rng.next().to_le_bytes();
                    c.copy_from_slice(&x[..c.len()]);
                }
                w.write_all(&buf[..n]).unwrap();
            } else {
                let mut written = 0;
                while written < n {
                    let line = log_line(&mut rng);
                    let take = line.len().min(n - written);
                    w.write_all(&line.as_bytes()[..take]).unwrap();
                    written += take;
                }
            }
            left -= n as u64;
        }
        w.flush().unwrap();
        if random {
            random_bytes += size
        } else {
            text_bytes += size
        }
        if i % 10 == 3 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    File::create(&done).unwrap();
    eprintln!(
        "generated: {} MB random, {} MB text",
        random_bytes / MB,
        text_bytes / MB
    );
    tree
}

/// A plausible application log line: fixed words, varying numbers and ids.
fn log_line(rng: &mut Rng) -> String {
    const LEVELS: [&str; 4] = ["INFO", "INFO", "WARN", "DEBUG"];
    const PATHS: [&str; 6] = [
        "/api/v1/orders",
        "/api/v1/users",
        "/health",
        "/static/app.js",
        "/login",
        "/cart",
    ];
    const STATUS: [u16; 5] = [200, 200, 200, 304, 404];
    let r = rng.next();
    format!(
        "2024-05-{:02}T{:02}:{:02}:{:02}.{:03}Z {} request_id={:016x} method=GET path={} status={} duration_ms={}\n",
        1 + r % 28,
        (r >> 5) % 24,
        (r >> 10) % 60,
        (r >> 16) % 60,
        (r >> 22) % 1000,
        LEVELS[((r >> 32) % 4) as usize],
        rng.next() >> 16,
        PATHS[((r >> 36) % 6) as usize],
        STATUS[((r >> 40) % 5) as usize],
        (r >> 44) % 900,
    )
}
