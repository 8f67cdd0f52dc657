//! Packaging checks: the systemd unit, the man page, `make install`/`make uninstall`.
//!
//! These call external tools. A missing tool is a failure that says what to install
//! (`make deps` installs them as root), never a silent pass:
//!   systemd-analyze: apt-get install systemd
//!   man:             apt-get install man-db
//!   mandoc:          apt-get install mandoc
//!   make:            apt-get install make
//! (tests/deps.sh holds the list). The alerting rules that `make install` ships are
//! validated with promtool in tests/alerting.rs.
//!
//! The offline vendored build is checked by `make offline-check` (called from `.ci/run`),
//! not here: it is a full release build.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_etcdmirror");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Highest accepted `systemd-analyze security` exposure (the target).
const MAX_EXPOSURE: f64 = 2.0;

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Panics (fails the test) when `tool` is missing, naming the Debian package.
fn require_tool(tool: &str, package: &str) {
    assert!(
        on_path(tool),
        "`{tool}` is not on PATH; this test needs it. On Debian/Ubuntu: \
         apt-get install {package}   (`make deps` as root installs it when missing)"
    );
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "etcdmirror-packaging-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn unit_source() -> String {
    read(&root().join("etcdmirror.service"))
}

/// The unit with ExecStart pointing at the freshly built binary (verify checks that the
/// executable exists), written as `<dir>/etcdmirror.service`.
fn unit_for_test(dir: &Path) -> PathBuf {
    let unit = unit_source();
    let prefix = "ExecStart=/usr/local/bin/etcdmirror ";
    assert!(
        unit.lines().any(|l| l.starts_with(prefix)),
        "etcdmirror.service must have `{prefix}...`: the Makefile's install rewrites it"
    );
    let unit = unit.replace(prefix, &format!("ExecStart={BIN} "));
    let path = dir.join("etcdmirror.service");
    fs::write(&path, unit).unwrap();
    path
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    require_tool("systemd-analyze", "systemd");
    let tmp = TempDir::new("verify");
    let unit = unit_for_test(&tmp.0);

    // verify checks that Documentation=man:etcdmirror(1) resolves, by running `man`: without
    // it that check would be skipped, so a missing `man` fails here instead.
    require_tool("man", "man-db");
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify");
    // Give verify our man page.
    let man1 = tmp.0.join("man/man1");
    fs::create_dir_all(&man1).unwrap();
    fs::copy(root().join("src/etcdmirror.1"), man1.join("etcdmirror.1")).unwrap();
    cmd.env("MANPATH", tmp.0.join("man"));
    let out = run(cmd.arg(&unit).current_dir(&tmp.0));
    let stderr = text(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("etcdmirror"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify failed ({}):\n{stderr}{}",
        out.status,
        text(&out.stdout)
    );
}

#[test]
fn unit_exposure_is_at_most_2() {
    require_tool("systemd-analyze", "systemd");
    let tmp = TempDir::new("security");
    let unit = unit_for_test(&tmp.0);
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .current_dir(&tmp.0));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no \"Overall exposure level\" line from systemd-analyze security ({}):\n{stdout}{}",
                out.status,
                text(&out.stderr)
            )
        });
    // "→ Overall exposure level for etcdmirror.service: 1.2 OK 🙂"
    let score: f64 = line
        .rsplit(": ")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the exposure from {line:?}"));
    eprintln!("systemd-analyze security: {}", line.trim());
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}; the findings:\n{stdout}"
    );
}

/// The restart policy follows the exit codes; a reader must find the reason.
#[test]
fn unit_restart_policy_matches_exit_codes() {
    let unit = unit_source();
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for want in [
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=2 3 4 5 6",
        "DynamicUser=yes",
        "EnvironmentFile=/etc/default/%N",
        "LoadCredential=src-password:/etc/%N/src-password",
        "LoadCredential=dst-password:/etc/%N/dst-password",
        // The credentials appear at their original paths inside the service, so
        // ETCDMIRROR_ARGS works for the unit and for root's manual runs alike.
        "BindReadOnlyPaths=/run/credentials/%n:/etc/%N",
    ] {
        assert!(
            settings.contains(&want),
            "etcdmirror.service lacks `{want}`"
        );
    }
    assert!(
        unit.contains("\"Recovery"),
        "the unit's comment on RestartPreventExitStatus must point at the README's Recovery section"
    );
    assert!(
        settings
            .iter()
            .any(|l| l.starts_with("ExecStart=") && l.ends_with(" $ETCDMIRROR_ARGS")),
        "ExecStart must pass $ETCDMIRROR_ARGS (split into words)"
    );
}

#[test]
fn man_page_passes_mandoc_lint() {
    require_tool("mandoc", "mandoc");
    let page = root().join("src/etcdmirror.1");
    let out = run(Command::new("mandoc").arg("-Tlint").arg(&page));
    let messages = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && messages.trim().is_empty(),
        "mandoc -Tlint src/etcdmirror.1 ({}):\n{messages}",
        out.status
    );
}

/// Long options in the option column of `--help` (not the ones mentioned in the
/// descriptions): lines that start with `-`, up to the first word that is neither a
/// flag nor an upper-case placeholder. `--SIDE-x` stands for `--src-x` and `--dst-x`.
fn help_flags() -> BTreeSet<String> {
    let out = run(Command::new(BIN).arg("--help"));
    assert!(out.status.success(), "etcdmirror --help: {}", out.status);
    let help = text(&out.stdout);
    let mut flags = BTreeSet::new();
    for line in help.lines() {
        let line = line.trim_start();
        if !line.starts_with('-') {
            continue;
        }
        for word in line.split_whitespace() {
            let word = word.trim_end_matches(',');
            if let Some(side_flag) = word.strip_prefix("--SIDE-") {
                // `--SIDE-user`: SIDE is src or dst.
                flags.insert(format!("--src-{side_flag}"));
                flags.insert(format!("--dst-{side_flag}"));
            } else if let Some(name) = word.strip_prefix("--") {
                flags.insert(format!("--{name}"));
            } else if word.starts_with('-') || word.chars().all(|c| c.is_ascii_uppercase()) {
                continue;
            } else {
                break;
            }
        }
    }
    assert!(
        flags.contains("--src-prefix") && flags.contains("--help"),
        "could not parse the option column of --help:\n{help}"
    );
    flags
}

/// Long options that have their own entry (`.TP` tag line) in the man page's OPTIONS
/// section.
fn man_flags() -> BTreeSet<String> {
    let page = read(&root().join("src/etcdmirror.1"));
    let mut flags = BTreeSet::new();
    let mut in_options = false;
    let mut tag_next = false;
    for line in page.lines() {
        if let Some(section) = line.strip_prefix(".SH ") {
            in_options = section.trim() == "OPTIONS";
            continue;
        }
        if !in_options {
            continue;
        }
        if line.starts_with(".TP") {
            tag_next = true;
            continue;
        }
        if tag_next {
            tag_next = false;
            flags.extend(long_options(&line.replace("\\-", "-")));
        }
    }
    assert!(
        flags.contains("--src-prefix"),
        "could not find the option entries in src/etcdmirror.1"
    );
    flags
}

fn long_options(s: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find("--") {
        let after = &rest[at + 2..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(after.len());
        if len > 0 {
            found.push(format!("--{}", &after[..len]));
        }
        rest = &after[len..];
    }
    found
}

#[test]
fn man_page_documents_exactly_the_flags_of_help() {
    let help = help_flags();
    let man = man_flags();
    let undocumented: Vec<_> = help.difference(&man).collect();
    let unknown: Vec<_> = man.difference(&help).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "src/etcdmirror.1 and `etcdmirror --help` disagree:\n  \
         in --help but without an entry in the man page's OPTIONS: {undocumented:?}\n  \
         in the man page but not in --help: {unknown:?}"
    );
}

#[test]
fn man_page_lists_every_exit_status() {
    let page = read(&root().join("src/etcdmirror.1"));
    let table: Vec<&str> = page
        .split(".SH EXIT STATUS")
        .nth(1)
        .expect("src/etcdmirror.1 has no EXIT STATUS section")
        .split(".TE")
        .next()
        .unwrap()
        .lines()
        .collect();
    for code in 0..=5 {
        assert!(
            table.iter().any(|l| l.starts_with(&format!("{code}\t"))),
            "EXIT STATUS table lacks a row for {code}"
        );
    }
}

/// The example defaults file only uses flags the binary knows.
#[test]
fn example_defaults_use_known_flags() {
    let example = read(&root().join("src/etcdmirror.default"));
    let args = example
        .lines()
        .find_map(|l| l.strip_prefix("ETCDMIRROR_ARGS="))
        .expect("src/etcdmirror.default sets no ETCDMIRROR_ARGS");
    let known = help_flags();
    let unknown: Vec<String> = long_options(args)
        .into_iter()
        .filter(|f| !known.contains(f))
        .collect();
    assert!(
        unknown.is_empty(),
        "src/etcdmirror.default uses flags `etcdmirror --help` does not list: {unknown:?}"
    );
    for flag in ["--reload", "--reload-only", "--dry-run", "--force"] {
        assert!(
            !long_options(args).iter().any(|f| f == flag),
            "the example ETCDMIRROR_ARGS must not contain {flag}"
        );
    }
}

/// Every regular file under `dir`, relative to it.
fn files_under(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(path.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn make(args: &[&str]) {
    let out = run(Command::new("make")
        .arg("--no-print-directory")
        .args(args)
        .current_dir(root())
        // Do not inherit the jobserver of an outer `make test`.
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .env_remove("CARGO_MAKEFLAGS"));
    assert!(
        out.status.success(),
        "make {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `make install` puts exactly five files in place and `make uninstall` removes exactly
/// them (and the rules' own directory). BIN= points at the test's debug binary so the test does not start a release
/// build; without it, `make install` builds target/release/etcdmirror when stale.
#[test]
fn make_install_and_uninstall_exact_file_set() {
    require_tool("make", "make");
    let cases: [(&[&str], [&str; 5], &str); 2] = [
        (
            &["PREFIX=/usr"],
            [
                "etc/default/etcdmirror.example",
                "usr/bin/etcdmirror",
                "usr/lib/systemd/system/etcdmirror.service",
                "usr/share/etcdmirror/etcdmirror.rules.yml",
                "usr/share/man/man1/etcdmirror.1",
            ],
            "ExecStart=/usr/bin/etcdmirror $ETCDMIRROR_ARGS",
        ),
        (
            &[],
            [
                "etc/default/etcdmirror.example",
                "usr/local/bin/etcdmirror",
                "usr/local/lib/systemd/system/etcdmirror.service",
                "usr/local/share/etcdmirror/etcdmirror.rules.yml",
                "usr/local/share/man/man1/etcdmirror.1",
            ],
            "ExecStart=/usr/local/bin/etcdmirror $ETCDMIRROR_ARGS",
        ),
    ];
    for (i, (vars, expected, exec_start)) in cases.iter().enumerate() {
        let tmp = TempDir::new(&format!("install{i}"));
        let destdir = format!("DESTDIR={}", tmp.0.display());
        let bin = format!("BIN={BIN}");
        let mut args = vec!["install", destdir.as_str(), bin.as_str()];
        args.extend_from_slice(vars);
        make(&args);

        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(files_under(&tmp.0), expected, "files after make {args:?}");

        let path = |rel: &str| {
            tmp.0
                .join(expected.iter().find(|f| f.ends_with(rel)).unwrap())
        };
        let mode = |rel: &str| fs::metadata(path(rel)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("bin/etcdmirror"), 0o755);
        for rel in [
            "etcdmirror.1",
            "etcdmirror.service",
            "etcdmirror.example",
            "etcdmirror.rules.yml",
        ] {
            assert_eq!(mode(rel), 0o644, "mode of {rel}");
        }
        assert_eq!(
            fs::read(path("bin/etcdmirror")).unwrap(),
            fs::read(BIN).unwrap()
        );
        assert_eq!(
            read(&path("man1/etcdmirror.1")),
            read(&root().join("src/etcdmirror.1"))
        );
        assert_eq!(
            read(&path("etcdmirror.example")),
            read(&root().join("src/etcdmirror.default"))
        );
        assert_eq!(
            read(&path("etcdmirror.rules.yml")),
            read(&root().join("src/etcdmirror.rules.yml"))
        );
        let rules_dir = path("etcdmirror.rules.yml").parent().unwrap().to_path_buf();
        let unit = read(&path("etcdmirror.service"));
        assert!(
            unit.lines().any(|l| l == *exec_start),
            "installed unit lacks `{exec_start}`"
        );
        assert_eq!(
            unit.replace(
                exec_start,
                "ExecStart=/usr/local/bin/etcdmirror $ETCDMIRROR_ARGS"
            ),
            unit_source(),
            "install must change only the ExecStart path of the unit"
        );

        let mut args = vec!["uninstall", destdir.as_str()];
        args.extend_from_slice(vars);
        make(&args);
        assert_eq!(
            files_under(&tmp.0),
            BTreeSet::new(),
            "files left after make {args:?}"
        );
        assert!(
            !rules_dir.exists(),
            "make uninstall left the empty {}",
            rules_dir.display()
        );
    }
}

/// The absolute path of `tool` on PATH (from Debian's `package`).
fn which(tool: &str, package: &str) -> PathBuf {
    require_tool(tool, package);
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
        .unwrap()
}

/// tests/deps.sh (what `make test` checks first) on a PATH that has every tool but promtool:
/// with ETCDMIRROR_NO_INSTALL=1, or as another user than root, it stops with one line
/// naming the install command; as root it runs apt-get (a stand-in here, which "installs"
/// promtool by linking it) and passes. With everything there it prints nothing.
#[test]
fn deps_script_names_the_command_or_installs() {
    let python = run(Command::new("python3")
        .args(["-c", "import sys, prometheus_client; print(sys.executable)"]));
    assert!(
        python.status.success(),
        "python3 with prometheus_client is needed (python3 -m pip install prometheus-client): {}",
        text(&python.stderr)
    );
    let tmp = TempDir::new("deps");
    let bin = tmp.0.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let link =
        |target: &Path, name: &str| std::os::unix::fs::symlink(target, bin.join(name)).unwrap();
    link(Path::new(text(&python.stdout).trim()), "python3");
    for (tool, package) in [
        ("etcd", "etcd-server"),
        ("etcdctl", "etcd-client"),
        ("make", "make"),
        ("systemd-analyze", "systemd"),
        ("man", "man-db"),
        ("mandoc", "mandoc"),
        ("openssl", "openssl"),
    ] {
        link(&which(tool, package), tool);
    }
    let promtool = which("promtool", "prometheus");
    let log = tmp.0.join("apt-get.log");
    let apt_get = bin.join("apt-get");
    fs::write(
        &apt_get,
        format!(
            "#!/bin/sh\necho \"$*\" >> {log}\ncase \" $* \" in *\" install \"*\" prometheus \"*) /bin/ln -s {promtool} {bin}/promtool ;; esac\n",
            log = log.display(),
            promtool = promtool.display(),
            bin = bin.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&apt_get, fs::Permissions::from_mode(0o755)).unwrap();
    let bash = which("bash", "bash");
    let deps = |no_install: bool| {
        let mut cmd = Command::new(&bash);
        cmd.arg(root().join("tests/deps.sh"))
            .arg("test")
            .env("PATH", &bin)
            .current_dir(&tmp.0);
        if no_install {
            cmd.env("ETCDMIRROR_NO_INSTALL", "1");
        } else {
            cmd.env_remove("ETCDMIRROR_NO_INSTALL");
        }
        run(&mut cmd)
    };
    let assert_one_line = |out: &Output| {
        let stderr = text(&out.stderr);
        assert!(
            out.status.code() == Some(1) && stderr.lines().count() == 1 && out.stdout.is_empty(),
            "expected exit 1 and one line on stderr ({}):\n{stderr}{}",
            out.status,
            text(&out.stdout)
        );
        for want in [
            "promtool (prometheus)",
            "apt-get update && apt-get install -y --no-install-recommends prometheus'",
        ] {
            assert!(stderr.contains(want), "the line lacks `{want}`: {stderr}");
        }
        assert!(!log.exists(), "apt-get ran without root");
    };

    assert_one_line(&deps(true));

    let uid = run(Command::new("id").arg("-u"));
    if text(&uid.stdout).trim() == "0" {
        let out = deps(false);
        assert!(
            out.status.success(),
            "as root, tests/deps.sh should install promtool ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        assert_eq!(
            read(&log),
            "update\ninstall -y --no-install-recommends prometheus\n",
            "the apt-get calls"
        );
    } else {
        assert_one_line(&deps(false));
        std::os::unix::fs::symlink(&promtool, bin.join("promtool")).unwrap();
    }

    let out = deps(true);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "with every tool there, tests/deps.sh should pass silently ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}
