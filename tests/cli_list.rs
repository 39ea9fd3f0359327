//! `mood list archs|methods|presets` names everything the other commands accept.

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
