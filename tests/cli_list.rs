//! `mood list archs|methods|presets` names everything the other commands accept, and every option
//! of every command has help text.

mod common;

use common::run_mood;

#[test]
fn list_names_every_arch_method_and_preset() {
    let (code, out, err) = run_mood(&["list", "archs"]);
    assert_eq!(code, 0, "{err}");
    for name in mood::model::VitConfig::preset_names() {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{name}: "))),
            "{name}"
        );
    }
    let (code, out, err) = run_mood(&["list", "methods"]);
    assert_eq!(code, 0, "{err}");
    for m in mood::ood::detector::METHODS {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{}: ", m.name)))
            .unwrap_or_else(|| panic!("{} not listed", m.name));
        for (k, v, _) in m.args {
            assert!(line.contains(&format!("{k}={v}")), "{line}");
        }
    }
    let (code, out, _) = run_mood(&["list", "presets"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 4, "{out}");
    let (code, _, err) = run_mood(&["list", "everything"]);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// The items (options and arguments) of a `-h` page, each with whether it has help text: clap
/// prints an item's text after it on the same line, or, when any text is long, on the next
/// lines, indented.
fn items(page: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = page.lines().collect();
    let mut found = Vec::new();
    let mut in_items = false;
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') {
            in_items = matches!(line.trim_end(), "Options:" | "Arguments:");
            continue;
        }
        let item = line.trim_start();
        let indent = line.len() - item.len();
        if !in_items
            || indent > 6
            || !(item.starts_with('-') || item.starts_with('<') || item.starts_with('['))
        {
            continue;
        }
        let same_line = item
            .split_once("  ")
            .is_some_and(|(_, t)| !t.trim().is_empty());
        let next_line = lines.get(i + 1).is_some_and(|n| {
            let t = n.trim_start();
            n.len() - t.len() > indent + 2 && !t.is_empty()
        });
        found.push((item.to_string(), same_line || next_line));
    }
    found
}

fn items_without_help(page: &str) -> Vec<String> {
    items(page)
        .into_iter()
        .filter(|(_, told)| !told)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn every_option_of_every_command_has_help_text() {
    let (code, top, err) = run_mood(&["-h"]);
    assert_eq!(code, 0, "{err}");
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    for c in ["demo", "export", "extract", "eval", "finetune", "list"] {
        assert!(commands.iter().any(|x| x == c), "{c} not in: {top}");
    }
    let mut missing = items_without_help(&top);
    let mut checked = 0;
    for c in &commands {
        let (code, page, err) = run_mood(&[c.as_str(), "-h"]);
        assert_eq!(code, 0, "{c}: {err}");
        checked += items(&page).len();
        missing.extend(
            items_without_help(&page)
                .into_iter()
                .map(|m| format!("{c}: {m}")),
        );
    }
    assert!(
        missing.is_empty(),
        "options without help text: {missing:#?}"
    );
    // Every command has at least --threads, --quiet, --progress-every and --help.
    assert!(checked >= 4 * commands.len(), "{checked} items read");
    // And the reading itself finds an option without text.
    assert_eq!(
        items_without_help("Options:\n      --bare\n      --told <X>  Says what it does\n"),
        ["--bare"]
    );
}

/// A reader that stops early (`mood info | head -1`) ends mood quietly, never with a panic.
#[test]
fn output_into_a_closed_pipe_is_no_panic() {
    use std::process::{Command, Stdio};
    for args in [&["info"][..], &["list", "methods"], &["-h"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mood"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the child writes its first line (it is still starting up).
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
