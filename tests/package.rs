//! The package as published: it tests itself, every test binary declares the features it
//! needs, it carries only what it needs, and its README reads right on crates.io.
//!
//! These read the manifest and the README as files, so they also run inside the
//! unpacked `.crate` (where the manifest is cargo's normalised copy).

use std::{fs, path::Path, process::Command};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The manifest's sections, in order: the header (`[dev-dependencies]`, `[[test]]`, ...)
/// and the lines under it, without comments and blank lines.
fn sections(manifest: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = vec![(String::new(), Vec::new())];
    for line in manifest.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            out.push((line.to_string(), Vec::new()));
        } else {
            out.last_mut().unwrap().1.push(line.to_string());
        }
    }
    out
}

/// The `name` of every `[[kind]]` target in the manifest.
fn targets(manifest: &str, kind: &str) -> Vec<String> {
    let header = format!("[[{kind}]]");
    sections(manifest)
        .into_iter()
        .filter(|(h, _)| *h == header)
        .filter_map(|(_, lines)| {
            lines.iter().find_map(|l| {
                let value = l.strip_prefix("name")?.trim_start().strip_prefix('=')?;
                Some(value.trim().trim_matches('"').to_string())
            })
        })
        .collect()
}

/// The `.rs` files directly in `dir`, and the folders in it with a `main.rs`: the
/// targets cargo would find there on its own.
fn target_files(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(Path::new(ROOT).join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            if path.is_dir() {
                path.join("main.rs").is_file().then_some(())?;
                return Some(path.file_name()?.to_str()?.to_string());
            }
            (path.extension()? == "rs").then_some(())?;
            Some(path.file_stem()?.to_str()?.to_string())
        })
        .collect();
    names.sort();
    names
}

#[test]
fn no_self_dev_dependency() {
    // Cargo strips a path dev-dependency on the package itself when packaging, and with
    // it the features it turned on: the tests then built in CI are not the published ones.
    let manifest = read("Cargo.toml");
    for (header, lines) in sections(&manifest) {
        let dev = header == "[dev-dependencies]" || header.starts_with("[dev-dependencies.");
        assert!(
            !(dev && header.contains("tower-backstop")),
            "a self dev-dependency: {header}"
        );
        if dev {
            for line in lines {
                assert!(
                    !line.starts_with("tower-backstop") && !line.starts_with("\"tower-backstop\""),
                    "a self dev-dependency: {line}"
                );
            }
        }
    }
}

#[test]
fn every_test_file_is_declared_with_its_features() {
    // A declared target gets `required-features`; one left to auto-discovery would need
    // `#![cfg(feature = ..)]` and pass with zero tests when the feature is off.
    let declared = targets(&read("Cargo.toml"), "test");
    for name in target_files("tests") {
        assert!(
            declared.contains(&name),
            "tests/{name} has no [[test]] entry in Cargo.toml"
        );
    }
}

#[test]
fn every_example_is_declared_with_its_features() {
    let declared = targets(&read("Cargo.toml"), "example");
    for name in target_files("examples") {
        if name == "demo" || name == "support" {
            continue; // The demo is a package of its own; `support` is a shared module.
        }
        assert!(
            declared.contains(&name),
            "examples/{name}.rs has no [[example]] entry in Cargo.toml"
        );
    }
}

#[test]
fn no_test_file_compiles_to_nothing_without_a_feature() {
    for name in target_files("tests") {
        let path = if Path::new(ROOT).join("tests").join(&name).is_dir() {
            format!("tests/{name}/main.rs")
        } else {
            format!("tests/{name}.rs")
        };
        let source = read(&path);
        assert!(
            !source
                .lines()
                .any(|l| l.trim_start().starts_with("#![cfg(")),
            "{path} is compiled out by a crate-level `#![cfg(..)]`: \
             use `required-features` in Cargo.toml instead"
        );
    }
}

#[test]
fn readme_links_are_absolute() {
    // crates.io renders the README without the repository next to it: a relative link
    // or image (`docs/…`, `LICENSE`) is broken there.
    let readme = read("README.md");
    let mut rest = readme.as_str();
    while let Some(at) = rest.find("](") {
        let target = &rest[at + 2..];
        let end = target.find(')').unwrap_or(target.len());
        let link = &target[..end];
        assert!(
            link.starts_with("https://") || link.starts_with('#'),
            "a relative link in the README: ({link})"
        );
        rest = &target[end..];
    }
}

#[test]
fn readme_snippets_are_doc_tests() {
    let lib = read("src/lib.rs");
    assert!(
        lib.contains("#[doc = include_str!(\"../README.md\")]"),
        "src/lib.rs no longer includes the README as doc-tests"
    );
}

#[test]
fn readme_snippets_paste_as_shown() {
    // rustdoc hides `# ` lines, GitHub and crates.io show them: a snippet with one does
    // not compile where a reader copies it from. Every line of a Rust block is real.
    let readme = read("README.md");
    let mut in_rust = false;
    for (n, line) in readme.lines().enumerate() {
        if let Some(fence) = line.strip_prefix("```") {
            in_rust = !in_rust && fence.starts_with("rust");
            continue;
        }
        let hidden = line == "#" || line.starts_with("# ");
        assert!(
            !(in_rust && hidden),
            "README.md line {}: a hidden doc-test line, which a reader cannot paste: {line}",
            n + 1
        );
    }
}

#[test]
fn readme_commands_pass_the_features_they_need() {
    // Commands wrap across lines in the README: read it as one line of words.
    let readme = read("README.md")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut commands = 0;
    for (at, _) in readme.match_indices("cargo run") {
        let command = &readme[at..];
        let command = &command[..command.find('`').unwrap_or(command.len())];
        if command.contains("--example") {
            commands += 1;
            assert!(
                command.contains("--all-features") || command.contains("--features"),
                "a README command without the features its example needs: {command}"
            );
        }
    }
    assert!(commands > 0, "the README shows how to run the examples");
    assert!(readme.contains("cargo test --all-features"));
}

#[test]
fn demo_is_a_package_of_its_own() {
    if Path::new(ROOT).join("Cargo.toml.orig").exists() {
        return; // Inside the published package, which does not carry the demo.
    }
    let demo = Path::new(ROOT).join("examples/demo");
    assert!(
        !Path::new(ROOT).join("examples/demo.rs").exists(),
        "examples/demo.rs builds every dev-dependency of the crate: the demo is examples/demo/"
    );
    let manifest = read("examples/demo/Cargo.toml");
    assert!(
        sections(&manifest).iter().any(|(h, _)| h == "[workspace]"),
        "the demo must be its own workspace, or the crate's dev-dependencies come along"
    );
    assert!(demo.join("Cargo.lock").is_file(), "the demo's Cargo.lock");
    let readme = read("README.md");
    assert!(readme.contains("cargo run --release --manifest-path examples/demo/Cargo.toml"));
}

#[test]
fn package_carries_only_what_it_needs() {
    let output = Command::new(env!("CARGO"))
        .args(["package", "--list", "--allow-dirty", "--offline"])
        .current_dir(ROOT)
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo package --list: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list = String::from_utf8(output.stdout).unwrap();
    let files: Vec<&str> = list.lines().collect();
    for file in &files {
        assert!(
            !(file.starts_with(".ci/")
                || file.starts_with("proptest-regressions/")
                || file.starts_with("docs/")
                || file.starts_with("examples/demo/")
                || file.starts_with("target/")
                || *file == ".gitignore"),
            "the package carries {file}"
        );
    }
    for needed in [
        "Cargo.toml",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "src/lib.rs",
    ] {
        assert!(files.contains(&needed), "the package lacks {needed}");
    }
}
