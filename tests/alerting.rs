//! The Prometheus alerting rules (src/etcdmirror.rules.yml) and the README's Alerting
//! section: `promtool check rules`, the rule unit tests in tests/alerting.test.yml, the
//! metric names against a running mirror's /metrics, the README's scrape configuration and
//! its textfile wrapper around `--check`.
//!
//! Tool: promtool (Debian package prometheus; `make deps` installs it as root). Tests fail,
//! never skip, when it is missing.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

fn rules_path() -> PathBuf {
    root().join("src/etcdmirror.rules.yml")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Run promtool with `args` in `dir`, `stdin` fed to it; fails the test when promtool is
/// not installed.
fn promtool(args: &[&str], dir: &Path, stdin: &str) -> Output {
    require_tool("promtool", "prometheus");
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[track_caller]
fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The alert names of the rules file, in order (`- alert: Name` lines).
fn alert_names() -> Vec<String> {
    let names: Vec<String> = read(&rules_path())
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim().to_string())
        .collect();
    assert!(names.len() >= 8, "too few alerts found: {names:?}");
    names
}

/// Every `etcdmirror_...` metric name the rules use.
fn metric_names_in_rules() -> BTreeSet<String> {
    let rules = read(&rules_path());
    let mut names = BTreeSet::new();
    for expr in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
    {
        let mut rest = expr;
        while let Some(at) = rest.find("etcdmirror_") {
            let tail = &rest[at..];
            let len = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..len].to_string());
            rest = &tail[len..];
        }
    }
    assert!(
        names.contains("etcdmirror_lag"),
        "no metric names found in the rules' expressions: {names:?}"
    );
    names
}

/// The README's indented code block whose first line is `first`, dedented.
fn readme_block(first: &str) -> String {
    let readme = read(&root().join("README.md"));
    let mut lines = readme.lines().skip_while(|l| *l != format!("    {first}"));
    let mut block = String::new();
    for line in lines.by_ref() {
        if line.is_empty() {
            block.push('\n');
        } else if let Some(code) = line.strip_prefix("    ") {
            block.push_str(code);
            block.push('\n');
        } else {
            break;
        }
    }
    assert!(
        !block.is_empty(),
        "README.md has no indented code block starting with `{first}`"
    );
    block.trim_end().to_string() + "\n"
}

#[test]
fn rules_pass_promtool_check() {
    let out = promtool(
        &["check", "rules", rules_path().to_str().unwrap()],
        &root(),
        "",
    );
    assert_success(&out, "promtool check rules src/etcdmirror.rules.yml");
    let report = text(&out.stdout);
    let want = format!("SUCCESS: {} rules found", alert_names().len());
    assert!(report.contains(&want), "expected `{want}`:\n{report}");
}

/// The unit tests pass, and each alert has a case where it fires (an `alertname:` line
/// followed by a non-empty `exp_alerts:`).
#[test]
fn rule_unit_tests_show_every_alert_firing() {
    let tests = root().join("tests");
    let out = promtool(&["test", "rules", "alerting.test.yml"], &tests, "");
    assert_success(&out, "promtool test rules tests/alerting.test.yml");

    let file = read(&tests.join("alerting.test.yml"));
    let lines: Vec<&str> = file.lines().map(str::trim).collect();
    let mut fired = BTreeSet::new();
    for pair in lines.windows(2) {
        if let Some(name) = pair[0].strip_prefix("alertname: ") {
            if pair[1] == "exp_alerts:" {
                fired.insert(name.trim().to_string());
            }
        }
    }
    let never: Vec<String> = alert_names()
        .into_iter()
        .filter(|n| !fired.contains(n))
        .collect();
    assert!(
        never.is_empty(),
        "tests/alerting.test.yml never shows these alerts firing: {never:?}"
    );
}

/// The README's Prometheus configuration loads the rules and names the job they expect.
#[test]
fn readme_prometheus_config_loads_the_rules() {
    let installed = "/usr/local/share/etcdmirror/etcdmirror.rules.yml";
    let config = readme_block("rule_files:");
    assert!(
        config.contains(installed) && config.contains("job_name: etcdmirror"),
        "README's Prometheus configuration should load {installed} and scrape job etcdmirror:\n{config}"
    );
    assert!(
        read(&rules_path()).contains("up{job=\"etcdmirror\"}"),
        "the rules should select the job the README configures"
    );
    let scratch = Scratch::new("promconfig");
    let path = scratch.path.join("prometheus.yml");
    fs::write(
        &path,
        config.replace(installed, rules_path().to_str().unwrap()),
    )
    .unwrap();
    let out = promtool(&["check", "config", path.to_str().unwrap()], &root(), "");
    assert_success(&out, "promtool check config (README's configuration)");
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        report.contains(&format!("SUCCESS: {} rules found", alert_names().len())),
        "promtool check config did not load the rules:\n{report}"
    );
}

/// GET /metrics from 127.0.0.1:`port`, or None.
fn scrape(port: u16) -> Option<String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The sample lines of an exposition: (series as written, value).
fn samples(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.to_string()))
        })
        .collect()
}

fn series_name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

/// A real mirror, replicating and idle: every metric the rules read (but the textfile
/// ones of the `--check` wrapper) is in its /metrics, and its values held for 40 minutes
/// fire no alert.
#[test]
fn rules_read_what_a_running_mirror_exports_and_stay_quiet_on_it() {
    let p = Pair::start("alerting");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let mut started = None;
    for _ in 0..10 {
        let port = free_port();
        let args: Vec<String> = ["--port", &port.to_string(), "--listen", "127.0.0.1"]
            .iter()
            .map(|s| s.to_string())
            .chain([p.src.url.clone(), p.dst.url.clone()])
            .collect();
        let mut m = Mirror::spawn(args);
        poll_until(Duration::from_secs(15), || {
            m.exited().is_some() || m.stderr().contains("Starting replication at")
        });
        match m.exited() {
            // another process took the port between free_port() and the bind
            Some(2) if m.stderr().contains("--port") => continue,
            Some(code) => panic!("etcdmirror exited {code}:\n{}", m.stderr()),
            None => {
                started = Some((m, port));
                break;
            }
        }
    }
    let (mut m, port) = started.expect("no free port for the metrics endpoint in 10 tries");
    p.src.set("/alerting/k", "v");
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    assert_eq!(p.dst.get("/replica/alerting/k").as_deref(), Some("v"));
    // The event's arrival is a watch round trip: the gauge is no longer -1.
    let mut exposition = String::new();
    m.wait_for(
        Duration::from_secs(10),
        "etcdmirror_seconds_since_last_watch >= 0 on /metrics",
        || {
            exposition = scrape(port).unwrap_or_default();
            samples(&exposition).iter().any(|(s, v)| {
                s == "etcdmirror_seconds_since_last_watch"
                    && v.parse::<f64>().is_ok_and(|v| v >= 0.0)
            })
        },
    );
    m.assert_alive("after the scrape");

    let exported: BTreeSet<String> = samples(&exposition)
        .iter()
        .map(|(s, _)| series_name(s).to_string())
        .collect();
    let missing: Vec<String> = metric_names_in_rules()
        .into_iter()
        .filter(|n| !n.starts_with("etcdmirror_check_") && !exported.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "the rules read metrics a running mirror does not export: {missing:?}\n{exposition}"
    );

    // The scrape as Prometheus stores it (job and instance added), held for 40 minutes.
    let mut input = String::new();
    let target = "job=\"etcdmirror\",instance=\"replica:8000\"";
    input.push_str(&format!(
        "      - series: 'up{{{target}}}'\n        values: '1x40'\n"
    ));
    for (series, value) in samples(&exposition) {
        let labelled = match series.strip_suffix('}') {
            Some(open) => format!("{open},{target}}}"),
            None => format!("{series}{{{target}}}"),
        };
        assert!(
            !labelled.contains('\''),
            "a quote in a series breaks the YAML: {labelled}"
        );
        input.push_str(&format!(
            "      - series: '{labelled}'\n        values: '{value}x40'\n"
        ));
    }
    let mut checks = String::new();
    for name in alert_names()
        .iter()
        .filter(|n| !n.starts_with("EtcdMirrorCheck"))
    {
        checks.push_str(&format!(
            "      - {{eval_time: 35m, alertname: {name}, exp_alerts: []}}\n"
        ));
    }
    let scratch = Scratch::new("promtest");
    let test = format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - name: a real scrape\n    \
         interval: 1m\n    input_series:\n{input}    alert_rule_test:\n{checks}",
        rules_path().display()
    );
    fs::write(scratch.path.join("real.test.yml"), &test).unwrap();
    let out = promtool(&["test", "rules", "real.test.yml"], &scratch.path, "");
    assert!(
        out.status.success(),
        "a healthy mirror's metrics fire an alert ({}):\n{}{}\n---- test ----\n{test}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The README's cron wrapper, run with a stand-in `etcdmirror` that exits with a given
/// code: it passes `--check` and the unit's arguments, and leaves a textfile that promtool
/// accepts with the status and the time the rules read.
#[test]
fn readme_check_wrapper_writes_the_metrics_the_rules_read() {
    let script = readme_block("#!/bin/sh");
    let scratch = Scratch::new("wrapper");
    let dir = &scratch.path;
    let (bin, textfiles) = (dir.join("bin"), dir.join("textfile"));
    fs::create_dir_all(&bin).unwrap();
    fs::create_dir_all(&textfiles).unwrap();
    let defaults = dir.join("default-etcdmirror");
    fs::write(
        &defaults,
        "# as in src/etcdmirror.default\nETCDMIRROR_ARGS=\"--src-prefix /conftool --strip https://src.example:2379 https://dst.example:2379\"\n",
    )
    .unwrap();
    for fixed in [
        "/etc/default/etcdmirror",
        "/var/lib/prometheus/node-exporter",
        "PATH=/usr/local/bin:",
    ] {
        assert!(
            script.contains(fixed),
            "the README's wrapper no longer contains `{fixed}`; adapt this test:\n{script}"
        );
    }
    let script = script
        .replace("/etc/default/etcdmirror", defaults.to_str().unwrap())
        .replace(
            "/var/lib/prometheus/node-exporter",
            textfiles.to_str().unwrap(),
        )
        .replace("PATH=/usr/local/bin:", &format!("PATH={}:", bin.display()));
    let wrapper = dir.join("etcdmirror-check-textfile");
    fs::write(&wrapper, &script).unwrap();
    let args_file = dir.join("args");
    let stub = bin.join("etcdmirror");
    fs::write(
        &stub,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\necho \"STATUS: stand-in\"\nexit \"$STUB_EXIT\"\n",
            args_file.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();

    let metric_names: BTreeSet<String> = metric_names_in_rules()
        .into_iter()
        .filter(|n| n.starts_with("etcdmirror_check_"))
        .collect();
    assert_eq!(
        metric_names,
        BTreeSet::from([
            "etcdmirror_check_status".to_string(),
            "etcdmirror_check_last_run_timestamp_seconds".to_string()
        ]),
        "the rules read other textfile metrics than this test checks"
    );

    for (exit, status) in [(2, 2), (0, 0), (3, 3), (1, 1), (7, 3)] {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let out = Command::new("sh")
            .arg(&wrapper)
            .env("STUB_EXIT", exit.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("run sh");
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_success(
            &out,
            &format!("the README's wrapper (stand-in exit {exit})"),
        );
        assert_eq!(
            read(&args_file).lines().collect::<Vec<_>>(),
            [
                "--check",
                "--src-prefix",
                "/conftool",
                "--strip",
                "https://src.example:2379",
                "https://dst.example:2379"
            ],
            "the arguments the wrapper gives etcdmirror"
        );
        let files: Vec<String> = fs::read_dir(&textfiles)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files,
            ["etcdmirror_check.prom"],
            "the textfile directory holds exactly the result (no temporary file)"
        );
        let prom = read(&textfiles.join("etcdmirror_check.prom"));
        let lint = promtool(&["check", "metrics"], dir, &prom);
        assert_success(&lint, &format!("promtool check metrics on:\n{prom}"));
        let value = |name: &str| -> f64 {
            samples(&prom)
                .iter()
                .find(|(s, _)| s == name)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} sample in:\n{prom}"))
        };
        assert_eq!(
            value("etcdmirror_check_status"),
            f64::from(status),
            "status for exit {exit}:\n{prom}"
        );
        let ts = value("etcdmirror_check_last_run_timestamp_seconds");
        assert!(
            (before as f64..=after as f64).contains(&ts),
            "timestamp {ts} not within [{before}, {after}]"
        );
    }
}
