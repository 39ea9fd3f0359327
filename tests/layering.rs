//! The layers point one way (ARCHITECTURE.md): a text scan of src/ for `crate::` paths that go
//! up. The library never imports the command line or the pipeline above it; the OOD scores stand
//! on features alone (no model, no training); the store knows nothing of the scores; the backend
//! knows nothing of the model or training.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// (layer, modules it must not name).
const RULES: &[(&str, &[&str])] = &[
    ("model", &["cli", "pipeline"]),
    ("backend", &["cli", "pipeline", "train", "model"]),
    ("ood", &["cli", "pipeline", "model", "train"]),
    ("data", &["cli", "pipeline"]),
    ("train", &["cli", "pipeline"]),
    ("store", &["cli", "pipeline", "ood"]),
    ("weights", &["cli", "pipeline"]),
    ("extract", &["cli", "pipeline"]),
    ("param_groups", &["cli", "pipeline", "train", "model"]),
    ("pipeline", &["cli"]),
];

/// The .rs files of a layer: src/NAME.rs and everything under src/NAME/.
fn files(src: &Path, layer: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let single = src.join(format!("{layer}.rs"));
    if single.is_file() {
        out.push(single);
    }
    let mut stack = vec![src.join(layer)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// The code of a file without its comments (line comments and /* */ blocks; string literals are
/// rare enough in `use` lines not to matter).
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The top-level modules a piece of code names through `crate::` (`crate::a::b`, and each item
/// of `crate::{a, b::c}`).
fn crate_modules(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        // `mood_crate::` or `some_crate::` is not this crate.
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let after = &code[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // Items of the group at brace depth 0.
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(&group[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(after));
        }
    }
    found.remove("");
    found
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_scan_sees_imports() {
    // The scanner itself: a path, a group and a comment.
    let text = "use crate::store::Manifest;\nuse crate::{cli, model::x};\n// crate::train\n";
    let got = crate_modules(&code(text));
    let want: BTreeSet<String> = ["store", "cli", "model"].map(String::from).into();
    assert_eq!(got, want);
    // And on the tree: the command line does import the library, so a layer that imported the
    // command line would be seen the same way.
    let cli: BTreeSet<String> = files(&src(), "cli")
        .iter()
        .flat_map(|f| crate_modules(&code(&std::fs::read_to_string(f).unwrap())))
        .collect();
    assert!(cli.contains("store") && cli.contains("ood"), "{cli:?}");
}

#[test]
fn layers_point_one_way() {
    let src = src();
    let mut broken = Vec::new();
    for (layer, banned) in RULES {
        let fs = files(&src, layer);
        assert!(
            !fs.is_empty() || *layer == "pipeline",
            "no files for layer {layer}"
        );
        for f in fs {
            let text = std::fs::read_to_string(&f).unwrap();
            for m in crate_modules(&code(&text)) {
                if banned.contains(&m.as_str()) {
                    broken.push(format!(
                        "{} imports crate::{m} ({layer} must not)",
                        f.strip_prefix(&src).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "layer rule broken:\n{}",
        broken.join("\n")
    );
}

/// Lines a command's file may have: its clap arguments (with their help) and a short `run` that
/// turns them into a pipeline call and prints the outcome. A file past it holds logic that
/// belongs in pipeline/. The benchmarks (bench*.rs) are not held to it yet.
const CLI_FILE_LINES: usize = 200;

#[test]
fn command_files_are_arguments_and_a_short_run() {
    let mut long = Vec::new();
    for f in files(&src(), "cli") {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("bench") {
            continue;
        }
        let lines = std::fs::read_to_string(&f).unwrap().lines().count();
        if lines > CLI_FILE_LINES {
            long.push(format!("src/cli/{name}: {lines} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "command files past {CLI_FILE_LINES} lines (move their logic into pipeline/):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_pipeline_takes_typed_values_not_arguments() {
    // clap belongs to cli/: the pipeline is called with plain options structs.
    let mut found = Vec::new();
    for f in files(&src(), "pipeline") {
        if code(&std::fs::read_to_string(&f).unwrap()).contains("clap::") {
            found.push(f.strip_prefix(src()).unwrap().display().to_string());
        }
    }
    assert!(found.is_empty(), "pipeline files that use clap: {found:?}");
}
