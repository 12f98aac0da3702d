//! The `Dockerfile`, checked without a Docker engine (and without hadolint): the runtime image
//! must hold every shared library the built binary needs, recent enough a glibc, and the
//! health check's program; the build stage must copy everything the crate compiles from, on
//! the same Debian release as the runtime. The runtime image's packages are Debian's required
//! packages (what `debian:<release>-slim` holds) and those the Dockerfile installs, with their
//! dependencies, resolved with this machine's dpkg and apt, so this machine must run the
//! image's Debian release.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

use regex::Regex;

use crate::common::tools::{repo, run, run_ok};

/// One instruction of the Dockerfile, continuation lines joined.
struct Instruction {
    /// 0 for the first `FROM`'s stage, 1 for the next.
    stage: usize,
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stage = 0;
    let mut instructions: Vec<Instruction> = Vec::new();
    for line in joined.into_iter().filter(|l| !l.trim().is_empty()) {
        let (keyword, args) = line.trim().split_once(char::is_whitespace).unwrap();
        let keyword = keyword.to_uppercase();
        if keyword == "FROM" && !instructions.is_empty() {
            stage += 1;
        }
        instructions.push(Instruction {
            stage,
            keyword,
            args: args.trim().to_owned(),
        });
    }
    instructions
}

/// The arguments of every `keyword` instruction of `stage`.
fn args_of<'a>(instructions: &'a [Instruction], stage: usize, keyword: &str) -> Vec<&'a str> {
    instructions
        .iter()
        .filter(|i| i.stage == stage && i.keyword == keyword)
        .map(|i| i.args.as_str())
        .collect()
}

/// This machine's Debian release (`VERSION_CODENAME`).
fn local_release() -> String {
    let os = std::fs::read_to_string("/etc/os-release").unwrap();
    os.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .expect("/etc/os-release names the release")
        .trim_matches('"')
        .to_owned()
}

/// The Debian package that installed `path` on this machine.
fn package_of(path: &str) -> String {
    let canonical = std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    for candidate in [path, canonical.as_str()] {
        let out = run("dpkg", &["-S", candidate], Path::new("/"));
        if out.status.success() {
            let line = String::from_utf8(out.stdout).unwrap();
            let package = line.split(':').next().unwrap();
            return package.trim().to_owned();
        }
    }
    panic!("no Debian package of this machine holds {path}");
}

/// Every package of the runtime image: Debian's required (and essential) packages, the
/// packages `apt-get install` installs in the runtime stage, and their dependencies.
fn runtime_packages(instructions: &[Instruction], runtime: usize) -> BTreeSet<String> {
    let listed = run_ok(
        "dpkg-query",
        &["-W", "-f", "${Package}\t${Priority}\t${Essential}\n"],
        Path::new("/"),
    );
    let mut roots: Vec<String> = listed
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split('\t').collect();
            (fields[1] == "required" || fields[2] == "yes").then(|| fields[0].to_owned())
        })
        .collect();
    let install = Regex::new(r"apt-get install([^&;|]*)").unwrap();
    for run_args in args_of(instructions, runtime, "RUN") {
        for found in install.captures_iter(run_args) {
            roots.extend(
                found[1]
                    .split_whitespace()
                    .filter(|w| !w.starts_with('-'))
                    .map(str::to_owned),
            );
        }
    }
    let mut args = vec![
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
    ];
    args.extend(roots.iter().map(String::as_str));
    let closure = run_ok("apt-cache", &args, Path::new("/"));
    closure
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .map(|l| l.split(':').next().unwrap().to_owned())
        .collect()
}

/// The build image and the runtime image are the same Debian release (this machine's, whose
/// packages stand for the image's), and the build image's Rust is at least the crate's
/// `rust-version`.
#[test]
fn the_images_are_one_debian_release_and_rust_is_recent_enough() {
    let instructions = dockerfile();
    let from = args_of(&instructions, 0, "FROM");
    let runtime = args_of(&instructions, 1, "FROM");
    assert_eq!((from.len(), runtime.len()), (1, 1), "two stages");
    let build = Regex::new(r"^rust:(\d+)\.(\d+)(?:\.\d+)?-([a-z]+) AS build$").unwrap();
    let found = build
        .captures(from[0])
        .unwrap_or_else(|| panic!("build image: {}", from[0]));
    let image_rust: (u32, u32) = (found[1].parse().unwrap(), found[2].parse().unwrap());
    let build_release = found[3].to_owned();
    let slim = Regex::new(r"^debian:([a-z]+)-slim$").unwrap();
    let runtime_release = slim
        .captures(runtime[0])
        .unwrap_or_else(|| panic!("runtime image: {}", runtime[0]))[1]
        .to_owned();
    assert_eq!(
        build_release, runtime_release,
        "build and runtime on one Debian release"
    );
    assert_eq!(
        runtime_release,
        local_release(),
        "this check resolves the runtime image's packages with this machine's apt, so it must \
         run on the image's Debian release"
    );

    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let wanted = Regex::new(r#"(?m)^rust-version = "(\d+)\.(\d+)"#).unwrap();
    let wanted = wanted
        .captures(&manifest)
        .expect("Cargo.toml has a rust-version");
    let wanted: (u32, u32) = (wanted[1].parse().unwrap(), wanted[2].parse().unwrap());
    assert!(
        image_rust >= wanted,
        "the build image's Rust {image_rust:?} < {wanted:?}"
    );
}

/// Every shared library the binary loads (`readelf -d` NEEDED, and its ELF interpreter) comes
/// from a package of the runtime image; its glibc symbol versions are at most the image's
/// glibc; the health check's program is installed; the binary and configuration are copied
/// where the entrypoint and the server look for them. (The binary checked is the debug build
/// the tests run; the image's release build links the same system libraries.)
#[test]
fn the_runtime_image_has_what_the_binary_needs() {
    let instructions = dockerfile();
    let packages = runtime_packages(&instructions, 1);
    let binary = env!("CARGO_BIN_EXE_smsbatch");
    let root = Path::new("/");

    let dynamic = run_ok("readelf", &["-d", binary], root);
    let needed = Regex::new(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]").unwrap();
    let needed: Vec<String> = needed
        .captures_iter(&dynamic)
        .map(|c| c[1].to_owned())
        .collect();
    assert!(
        !needed.is_empty(),
        "readelf -d {binary} lists no library:\n{dynamic}"
    );
    let ldd = run_ok("ldd", &[binary], root);
    let headers = run_ok("readelf", &["-l", binary], root);
    let interpreter = Regex::new(r"program interpreter: ([^\]]+)\]").unwrap();
    let mut files: Vec<String> = interpreter
        .captures_iter(&headers)
        .map(|c| c[1].to_owned())
        .collect();
    for library in &needed {
        // `libc.so.6 => /lib/…/libc.so.6 (0x…)`, or the loader as `/lib64/ld-….so.2 (0x…)`.
        let path = ldd.lines().find_map(|l| {
            let l = l.trim();
            match l.strip_prefix(&format!("{library} => ")) {
                Some(rest) => rest.split(" (").next(),
                None => l
                    .split(" (")
                    .next()
                    .filter(|p| p.ends_with(&format!("/{library}"))),
            }
        });
        let path = path.unwrap_or_else(|| panic!("ldd does not resolve {library}:\n{ldd}"));
        files.push(path.trim().to_owned());
    }
    for file in &files {
        let package = package_of(file);
        assert!(
            packages.contains(&package),
            "the binary needs {file}, from package {package}, which the runtime image lacks \
             (it has: {packages:?})"
        );
    }

    let symbols = run_ok("objdump", &["-T", binary], root);
    let version = Regex::new(r"GLIBC_(\d+)\.(\d+)").unwrap();
    let newest = version
        .captures_iter(&symbols)
        .map(|c| (c[1].parse::<u32>().unwrap(), c[2].parse::<u32>().unwrap()))
        .max()
        .expect("the binary uses glibc");
    let libc6 = run_ok("dpkg-query", &["-W", "-f", "${Version}", "libc6"], root);
    let glibc = Regex::new(r"^(\d+)\.(\d+)")
        .unwrap()
        .captures(&libc6)
        .unwrap();
    let glibc: (u32, u32) = (glibc[1].parse().unwrap(), glibc[2].parse().unwrap());
    assert!(
        newest <= glibc,
        "the binary needs GLIBC {newest:?}, the image has {glibc:?}"
    );

    // The HEALTHCHECK's program, and the one docker-compose.yml's health check of the
    // services built from this Dockerfile runs (`curl`).
    let check = args_of(&instructions, 1, "HEALTHCHECK");
    assert_eq!(check.len(), 1, "one HEALTHCHECK");
    let program = check[0]
        .split(" CMD ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let compose = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    assert!(
        compose.contains(&format!("test: [\"CMD\", \"{program}\"")),
        "docker-compose.yml's health check of the instances runs {program} too"
    );
    let path = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| format!("{dir}/{program}"))
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| panic!("{program} is not installed on this machine to look up"));
    let package = package_of(&path);
    assert!(
        packages.contains(&package),
        "the health check's {program} ({package}) is missing"
    );

    // The binary from the build stage's release target, onto the PATH, as the entrypoint.
    let workdir = args_of(&instructions, 0, "WORKDIR");
    let copy = args_of(&instructions, 1, "COPY");
    let binary_copy = format!(
        "--from=build {}/target/release/smsbatch /usr/local/bin/smsbatch",
        workdir.last().unwrap()
    );
    assert!(
        copy.contains(&binary_copy.as_str()),
        "COPY {binary_copy}: {copy:?}"
    );
    assert_eq!(args_of(&instructions, 1, "ENTRYPOINT"), ["[\"smsbatch\"]"]);
    // The configuration, in the working folder the server reads config/ from.
    assert!(
        copy.contains(&"config ./config"),
        "COPY config ./config: {copy:?}"
    );
    assert!(repo().join("config/default.yaml").exists());
}

/// The build stage copies everything the crate compiles from (the manifest and lock file, the
/// build script, `src`, and the folders `embed_migrations!` and `include_str!` read), and
/// `.dockerignore` leaves all of it in the build context.
#[test]
fn the_build_stage_copies_what_the_crate_compiles_from() {
    let instructions = dockerfile();
    let mut copied = BTreeSet::new();
    for args in args_of(&instructions, 0, "COPY") {
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        copied.extend(
            words[..words.len() - 1]
                .iter()
                .map(|w| w.trim_end_matches('/').to_owned()),
        );
    }
    let mut inputs: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "src"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    if repo().join("build.rs").exists() {
        inputs.insert("build.rs".into());
    }
    let macro_path =
        Regex::new(r#"(embed_migrations|include_str|include_bytes)!\("([^"]+)"\)"#).unwrap();
    let mut stack = vec![repo().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for found in macro_path.captures_iter(&text) {
                // embed_migrations! reads from the crate's root; the others from the file's
                // folder.
                let base = if &found[1] == "embed_migrations" {
                    repo()
                } else {
                    dir.clone()
                };
                let target = std::fs::canonicalize(base.join(&found[2])).unwrap();
                let relative = target.strip_prefix(repo()).unwrap();
                let top = relative.components().next().unwrap();
                inputs.insert(top.as_os_str().to_string_lossy().into_owned());
            }
        }
    }
    let missing: Vec<&String> = inputs.difference(&copied).collect();
    assert!(
        missing.is_empty(),
        "the build stage does not copy {missing:?} (copies {copied:?})"
    );

    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap_or_default();
    for pattern in ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let pattern = pattern.trim_matches('/');
        for path in &copied {
            assert!(
                path != pattern && !path.starts_with(&format!("{pattern}/")),
                ".dockerignore's {pattern} leaves {path} out of the build context"
            );
        }
    }
}
