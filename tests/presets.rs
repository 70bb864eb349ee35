//! Injection-site presets: the built-in file holds the nine sites, each valid; a bad file is
//! refused naming the file, the preset and the setting; a preset changes what is planned.

use sonoguide::plan::preset::{self, Structure};
use sonoguide::plan::{plan, TargetKind};
use sonoguide::sim::phantom::{frame_of, generate, PhantomParams};
use sonoguide::{Backend, Pipeline};

const SITES: [&str; 9] = [
    "knee-suprapatellar",
    "shoulder-sasd-bursa",
    "shoulder-glenohumeral-posterior",
    "elbow-common-extensor",
    "achilles-paratenon",
    "retrocalcaneal-bursa",
    "wrist-radiocarpal",
    "carpal-tunnel",
    "ankle-tibiotalar",
];

#[test]
fn the_built_in_presets_cover_every_site_and_are_valid() {
    let presets = preset::builtin().unwrap();
    let names: Vec<&str> = presets.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, SITES);
    for p in &presets {
        p.params().validate().unwrap();
        assert!(!p.sources.is_empty(), "{}: no source", p.name);
        // Every preset avoids bone, shadow, vessels and nerves with a margin of its own.
        for s in [
            Structure::Bone,
            Structure::Shadow,
            Structure::Vessel,
            Structure::Nerve,
        ] {
            assert!(
                p.avoid
                    .iter()
                    .any(|a| a.structure == s && a.margin_mm > 0.0),
                "{}: {s:?} not avoided",
                p.name
            );
        }
    }
    let ct = preset::find(&presets, "carpal-tunnel").unwrap();
    assert_eq!(ct.targets, [TargetKind::Perineural]);
    let ceo = preset::find(&presets, "elbow-common-extensor").unwrap();
    assert_eq!(ceo.targets[0], TargetKind::Intratendinous);
}

#[test]
fn bad_preset_files_are_refused_by_name() {
    let good = include_str!("../presets/sites.toml");
    let cases = [
        // NaN margin: a NaN would make every distance look safe.
        (
            good.replacen(
                "structure = \"nerve\", margin_mm = 2.0",
                "structure = \"nerve\", margin_mm = nan",
                1,
            ),
            "nerve_margin_mm",
        ),
        // A final approach beyond the bound.
        (
            good.replacen("final_approach_mm = 2.0", "final_approach_mm = 9.0", 1),
            "final_approach_mm",
        ),
        // "user" is not a kind to look for.
        (
            good.replacen(
                "targets = [\"effusion\", \"joint_space\"]",
                "targets = [\"user\"]",
                1,
            ),
            "targets",
        ),
        // An unknown field (a typo must not be ignored silently).
        (
            good.replacen("max_needle_mm = 50.0", "max_needel_mm = 50.0", 1),
            "max_needel_mm",
        ),
        // The same name twice.
        (
            format!("{good}\n{}", &good[good.find("[[preset]]").unwrap()..]),
            "defined twice",
        ),
    ];
    for (text, needle) in cases {
        assert_ne!(text, good, "{needle}: the case did not change the file");
        let e = preset::parse(&text, "edited.toml").unwrap_err().to_string();
        assert!(
            e.contains("edited.toml") && e.contains(needle),
            "{needle}: {e}"
        );
    }
    let e = preset::load(std::path::Path::new("/nonexistent/sites.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/sites.toml"), "{e}");
    let e = preset::find(&preset::builtin().unwrap(), "hip")
        .unwrap_err()
        .to_string();
    assert!(e.contains("hip") && e.contains("knee-suprapatellar"), "{e}");
}

#[test]
fn a_preset_sets_what_is_planned_and_is_reported() {
    let presets = preset::builtin().unwrap();
    let mut pp = PhantomParams::default();
    pp.seed = 2; // soft tissue with a tendon
    let frame = frame_of(&generate("preset", &pp).unwrap(), 0).unwrap();
    let achilles = preset::find(&presets, "achilles-paratenon").unwrap();
    let pipeline = Pipeline::builder()
        .backend(Backend::Cpu)
        .preset(achilles)
        .build()
        .unwrap();
    let r = pipeline.process(&frame).unwrap();
    let p = &r.plan;
    assert_eq!(p.preset.as_deref(), Some("achilles-paratenon"));
    assert_eq!(p.margins_mm.nerve, 3.0);
    if p.is_ok() {
        assert_eq!(p.target_kind, Some(TargetKind::Peritendinous));
        assert!(p.length_mm.unwrap() <= achilles.max_needle_mm);
        let a = p.angle_deg.unwrap();
        assert!(
            (achilles.angle.min..=achilles.angle.max).contains(&a),
            "{a}"
        );
        // A peritendinous path never crosses the tendon.
        assert!(p.clearances_mm.tendon.is_none_or(|d| d > 0.0));
    } else {
        assert!(p.reason.is_some());
    }
    // The same frame under the carpal-tunnel preset looks for a nerve only: this phantom's
    // target kinds do not include it unless a nerve was found.
    let ct = preset::find(&presets, "carpal-tunnel").unwrap();
    let q = plan(&frame, &r.segmentation, &ct.params());
    assert!(q.target_kind.is_none_or(|k| k == TargetKind::Perineural));
}
