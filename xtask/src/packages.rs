//! What each task needs installed, read from `xtask/required-packages.txt` (the one list, which
//! `.ci/run` and the GitHub workflow install from with `cargo xtask packages`).

use crate::which::find_program;
use anyhow::{bail, Context};
use std::path::PathBuf;

const LIST: &str = include_str!("../required-packages.txt");

/// One line of the list.
struct Requirement {
    task: &'static str,
    /// A program name, or an absolute path for a file that is not a program (a library).
    program: &'static str,
    package: Package,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Package {
    Apt(&'static str),
    Cargo(&'static str),
}

impl Package {
    fn install_command(packages: &[Package]) -> String {
        let apt: Vec<&str> =
            packages.iter().filter_map(|p| if let Package::Apt(n) = p { Some(*n) } else { None }).collect();
        let cargo: Vec<&str> =
            packages.iter().filter_map(|p| if let Package::Cargo(n) = p { Some(*n) } else { None }).collect();
        let mut commands = Vec::new();
        if !apt.is_empty() {
            commands.push(format!("sudo apt-get install -y {}", apt.join(" ")));
        }
        if !cargo.is_empty() {
            commands.push(format!("cargo install --locked {}", cargo.join(" ")));
        }
        commands.join(" && ")
    }
}

fn requirements() -> Vec<Requirement> {
    LIST.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [task, program, package] = fields[..] else {
                panic!("xtask/required-packages.txt: not `task program package`: {line:?}")
            };
            let package = match package.strip_prefix("cargo:") {
                Some(krate) => Package::Cargo(krate),
                None => Package::Apt(package),
            };
            Requirement { task, program, package }
        })
        .collect()
}

/// `ci` stands for the tasks `cargo xtask ci` runs.
fn expand(tasks: &[&str]) -> Vec<&'static str> {
    let mut expanded = Vec::new();
    for task in tasks {
        match *task {
            "ci" => expanded.extend(["e2e", "cluster", "nix-check", "rules"]),
            "e2e" => expanded.push("e2e"),
            "cluster" => expanded.push("cluster"),
            "nix-check" => expanded.push("nix-check"),
            "rules" => expanded.push("rules"),
            "systemd-e2e" => expanded.push("systemd-e2e"),
            _ => {}
        }
    }
    expanded
}

fn installed(requirement: &Requirement) -> Option<PathBuf> {
    if requirement.program.starts_with('/') {
        Some(PathBuf::from(requirement.program)).filter(|p| p.is_file())
    } else {
        find_program(requirement.program)
    }
}

/// The packages of the given tasks (all when none) that are not installed, each once.
fn missing(tasks: &[&str]) -> Vec<Package> {
    let tasks = expand(tasks);
    let mut missing = Vec::new();
    for requirement in requirements() {
        if (tasks.is_empty() || tasks.contains(&requirement.task))
            && installed(&requirement).is_none()
            && !missing.contains(&requirement.package)
        {
            missing.push(requirement.package);
        }
    }
    missing
}

/// Fails with the exact install command when something `task` needs is missing.
pub fn require(task: &str) -> anyhow::Result<()> {
    let missing = missing(&[task]);
    if !missing.is_empty() {
        bail!(
            "`cargo xtask {task}` needs packages that are missing; install them with:\n    {}\n\
             (Nix: `nix develop`, the dev shell provides them)",
            Package::install_command(&missing)
        );
    }
    Ok(())
}

/// Where one program of the list is, or how to install it.
pub fn program(name: &str) -> anyhow::Result<PathBuf> {
    let requirement = requirements()
        .into_iter()
        .find(|r| r.program == name)
        .with_context(|| format!("`{name}` is not in xtask/required-packages.txt"))?;
    installed(&requirement).with_context(|| {
        format!("`{name}` is not installed: {}", Package::install_command(&[requirement.package]))
    })
}

/// `cargo xtask packages apt|cargo [TASK...]`: the missing packages of that kind, one per line,
/// for `.ci/run` and the workflow to install.
pub fn print_missing(args: &[String]) -> anyhow::Result<()> {
    let (kind, tasks) = args.split_first().context("usage: cargo xtask packages apt|cargo [TASK...]")?;
    if kind != "apt" && kind != "cargo" {
        bail!("unknown package kind `{kind}`: apt or cargo");
    }
    let tasks: Vec<&str> = tasks.iter().map(String::as_str).collect();
    for task in &tasks {
        if expand(&[task]).is_empty() {
            bail!("unknown task `{task}`: ci, e2e, cluster, nix-check, rules or systemd-e2e");
        }
    }
    for package in missing(&tasks) {
        match (kind.as_str(), package) {
            ("apt", Package::Apt(name)) | ("cargo", Package::Cargo(name)) => println!("{name}"),
            _ => {}
        }
    }
    Ok(())
}
