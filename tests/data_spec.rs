//! The one parser of `--data` / `--val` specs (data::spec::DataSpec): each form parsed to its
//! typed value, and each malformed spec refused with the one-line message the commands print.

use mood::data::spec::{DataSpec, DigitsPart};

#[test]
fn digits_specs() {
    assert_eq!(
        DataSpec::parse("digits").unwrap(),
        DataSpec::Digits {
            classes: vec![],
            part: None
        }
    );
    assert_eq!(
        DataSpec::parse("digits:3,0-1@test").unwrap(),
        DataSpec::Digits {
            classes: vec![0, 1, 3],
            part: Some(DigitsPart::Test)
        }
    );
    assert_eq!(
        DataSpec::parse("digits@train").unwrap(),
        DataSpec::Digits {
            classes: vec![],
            part: Some(DigitsPart::Train)
        }
    );
    let e = DataSpec::parse("digits@val").unwrap_err().to_string();
    assert!(e.contains("`train` and `test`"), "{e}");
    let e = DataSpec::parse("digits:0-12").unwrap_err().to_string();
    assert!(e.contains("bad class list"), "{e}");
}

#[test]
fn other_specs() {
    assert!(matches!(
        DataSpec::parse("cifar10:/d@test").unwrap(),
        DataSpec::Cifar(_)
    ));
    let dir = std::env::temp_dir();
    assert_eq!(
        DataSpec::parse(dir.to_str().unwrap()).unwrap(),
        DataSpec::Folder(dir.clone())
    );
    let e = DataSpec::parse("/no/such/dir").unwrap_err().to_string();
    assert!(e.contains("no such directory"), "{e}");
    let e = DataSpec::parse("imagenet").unwrap_err().to_string();
    assert!(e.contains("not a directory or a known data set"), "{e}");
}

/// A digits spec naming its part reads that part for training too (one parser for extract and
/// train): the same images and labels as the digits' own split.
#[test]
fn training_reads_a_named_digits_part() {
    let cfg = mood::model::VitConfig::preset("beit_tiny_patch8_32").unwrap();
    let (got, classes) =
        mood::pipeline::data::training_data("digits:0-1@test", "mood", &cfg, true).unwrap();
    let d = mood::data::digits::load().unwrap();
    let (images, labels) = mood::data::digits::split(&d, &[0, 1], true, cfg.img_size);
    assert_eq!(got.labels, labels);
    assert_eq!(got.images, images);
    assert_eq!(classes, Some(2));
    // Without a part, training takes the train part.
    let (train, _) = mood::pipeline::data::training_data("digits:0-1", "mood", &cfg, true).unwrap();
    let (_, train_labels) = mood::data::digits::split(&d, &[0, 1], false, cfg.img_size);
    assert_eq!(train.labels, train_labels);
}
