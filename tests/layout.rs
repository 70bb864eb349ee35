//! The layout holds: the module graph read from the sources has no cycle between the core
//! modules, dependencies run the documented way, nothing in the pipeline uses the simulation
//! harness, `gpu` names no kernel, and the command line stays small.
//!
//! The graph is read from the code itself: every `crate::x` path in `src/<x>.rs` or
//! `src/<x>/…` (comments and doc comments removed, so that doc links do not count) is an edge
//! from the file's top-level module to `x`; names re-exported at the crate root
//! (`crate::Frame`) resolve to the module they come from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The modules that must not depend on each other in a cycle.
const CORE: [&str; 6] = ["frame", "dicom", "gpu", "kernels", "segment", "plan"];

/// Longest `main.rs` of the command line, lines: it parses and dispatches only.
const MAX_MAIN_LINES: usize = 150;
/// Longest command file, lines (about 300: one command group each).
const MAX_COMMAND_FILE_LINES: usize = 320;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text without `//` comments (line, doc and inner doc comments).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // Keep "//" inside string literals such as URLs: only cut when no quote precedes.
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Names of the items inside `crate::{…}` groups and after `crate::`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level entries of the group: `a`, `b::c`, `d::{e, f}` → a, b, d.
            let mut depth = 0;
            let mut entry = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(std::mem::take(&mut entry));
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    entry.push(c);
                }
            }
            found.push(entry);
        } else {
            found.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    found
        .into_iter()
        .map(|e| e.trim().split("::").next().unwrap_or("").trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

/// Crate-root names re-exported from a module: `pub use despeckle::{Despeckler, Filter};`.
fn root_exports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let code = strip_comments(lib);
    for stmt in code.split(';') {
        let stmt = stmt.trim();
        let Some(rest) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        let names = names.trim_matches(|c| c == '{' || c == '}' || char::is_whitespace(c));
        for n in names.split(',') {
            let n = n.trim();
            if !n.is_empty() {
                map.insert(n.to_string(), module.trim().to_string());
            }
        }
    }
    map
}

/// Top-level module of a library file, or `None` for the crate root and the binaries.
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    if first == "bin" || first == "lib.rs" {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_string())
}

/// Module → modules it uses (self-edges left out).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let exports = root_exports(&lib);
    let modules: BTreeSet<String> = strip_comments(&lib)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            Some(rest.trim_end_matches(';').to_string())
        })
        .collect();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let Some(m) = module_of(&f) else { continue };
        let code = strip_comments(&std::fs::read_to_string(&f).unwrap());
        let entry = g.entry(m.clone()).or_default();
        for name in crate_paths(&code) {
            let target = if modules.contains(&name) {
                name
            } else if let Some(module) = exports.get(&name) {
                module.clone()
            } else {
                continue;
            };
            if target != m {
                entry.insert(target);
            }
        }
    }
    g
}

/// A cycle among `nodes` using only edges between them, if there is one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>, nodes: &[&str]) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        nodes: &[&str],
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            if nodes.contains(&next.as_str()) {
                if let Some(c) = visit(next, g, nodes, stack, done) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    nodes
        .iter()
        .find_map(|n| visit(n, g, nodes, &mut Vec::new(), &mut done))
}

#[test]
fn the_graph_reader_sees_known_edges() {
    // Guards the reader itself: these edges exist by design, so a reader that finds none of
    // them would make every other check here pass vacuously.
    let g = graph();
    for (from, to) in [
        ("dicom", "frame"),
        ("segment", "kernels"),
        ("plan", "segment"),
        ("pipeline", "plan"),
        ("sim", "pipeline"),
    ] {
        assert!(
            g[from].contains(to),
            "{from} → {to} not seen: {:?}",
            g[from]
        );
    }
    assert_eq!(
        find_cycle(&g, &["pipeline", "sim"]).is_none(),
        !g["pipeline"].contains("sim"),
        "the cycle finder agrees with the edges"
    );
}

#[test]
fn core_modules_have_no_cycle() {
    let g = graph();
    assert_eq!(find_cycle(&g, &CORE), None, "graph: {g:#?}");
}

#[test]
fn dependencies_run_one_way() {
    let g = graph();
    // Who must not use whom (DESIGN.md: frame ← dicom; gpu ← kernels ← segment ← plan ←
    // overlay; pipeline uses them all).
    let forbidden: [(&str, &[&str]); 6] = [
        (
            "frame",
            &[
                "dicom", "gpu", "kernels", "segment", "plan", "pipeline", "batch", "overlay",
            ],
        ),
        (
            "gpu",
            &[
                "dicom",
                "kernels",
                "despeckle",
                "segment",
                "plan",
                "pipeline",
                "batch",
            ],
        ),
        (
            "kernels",
            &["dicom", "segment", "plan", "pipeline", "batch", "overlay"],
        ),
        (
            "segment",
            &["dicom", "plan", "pipeline", "batch", "overlay", "igtl"],
        ),
        ("plan", &["dicom", "pipeline", "batch", "overlay", "igtl"]),
        (
            "dicom",
            &["gpu", "kernels", "segment", "plan", "pipeline", "batch"],
        ),
    ];
    for (from, not) in forbidden {
        for to in not {
            assert!(!g[from].contains(*to), "{from} uses {to}: {:?}", g[from]);
        }
    }
}

#[test]
fn no_pipeline_module_uses_the_harness() {
    let g = graph();
    for (m, uses) in &g {
        if m != "sim" {
            assert!(!uses.contains("sim"), "{m} uses the sim harness");
        }
    }
}

#[test]
fn gpu_names_no_kernel() {
    let stems: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders"))
            .unwrap()
            .filter_map(|e| {
                let p = e.unwrap().path();
                (p.extension()? == "wgsl")
                    .then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
            })
            .filter(|s| s != "common")
            .collect();
    assert!(stems.len() >= 8, "shaders found: {stems:?}");
    let mut files = Vec::new();
    rust_files(&src().join("gpu"), &mut files);
    for f in files {
        let code = strip_comments(&std::fs::read_to_string(&f).unwrap());
        for s in &stems {
            assert!(
                !code.contains(&format!("\"{s}\"")),
                "{} names the kernel {s}",
                f.display()
            );
        }
    }
}

#[test]
fn the_command_line_stays_small() {
    let dir = src().join("bin").join("sonoguide");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(files.len() >= 5, "one file per command group: {files:?}");
    for f in files {
        let lines = std::fs::read_to_string(&f).unwrap().lines().count();
        let max = if f.ends_with("main.rs") {
            MAX_MAIN_LINES
        } else {
            MAX_COMMAND_FILE_LINES
        };
        assert!(
            lines <= max,
            "{} has {lines} lines (at most {max})",
            f.display()
        );
    }
}

#[test]
fn the_reader_parses_groups_and_comments() {
    let code = strip_comments(
        "use crate::{frame::Frame, gpu::{Backend, Ran}, Result};\n/// [`crate::sim::x`]\nlet a = crate::plan::plan(); // crate::overlay",
    );
    assert_eq!(crate_paths(&code), ["frame", "gpu", "Result", "plan"]);
}
