//! The NixOS module's option types against what the binary accepts.
//!
//! `nixos/module.nix` turns options into environment variables; `src/config.rs` parses them.
//! A type wider than the parser (say `ints.unsigned` for a `u16`) evaluates, builds and then
//! fails at every start. Nix cannot run here, so this test reads the module's text (nixfmt
//! keeps it regular): for every variable the module sets from an option, it renders the
//! extreme values the option's type admits the way the module renders them (`toString`,
//! `boolToString`, interpolation) and checks that `Settings::from_vars` takes each. A type
//! or a rendering it does not know fails the test, to be taught here, rather than passing.

use mqtt_gateway::config::Settings;
use std::collections::BTreeMap;

const MODULE: &str = include_str!("../nixos/module.nix");
const CONFIG: &str = include_str!("../src/config.rs");

/// Variables the module sets that `config.rs` does not parse, and who does.
const READ_ELSEWHERE: [(&str, &str); 2] = [
    ("RUST_LOG", "tracing's EnvFilter, which ignores what it cannot parse"),
    ("LOG_FORMAT", "logging::Format::from_env; the module sets the constant \"journald\""),
];

/// Variables the binary takes only together with others, which the module's assertions
/// require of a configuration (a lone one is refused at start, naming it).
const COMPANIONS: [(&str, &[(&str, &str)]); 2] = [
    ("DB_SSL_CA", &[("DB_SSL_MODE", "verify_ca")]),
    ("DB_SSL_CERT", &[("DB_SSL_KEY", "/run/credentials/mqtt-gateway.service/db-client-key")]),
];

/// Variables naming a file the binary reads at start (not only at connection time): the
/// samples' paths do not exist here, and the refusal must be for that alone.
const READ_AT_START: [&str; 1] = ["HTTP_CA_FILE"];

/// `name = value;` statements of the module's `environment` attribute set, values joined onto
/// one line.
fn environment() -> BTreeMap<String, String> {
    let start = MODULE.find("  environment = lib.filterAttrs").expect("the module's environment block");
    let end =
        start + MODULE[start..].find("// cfg.extraEnvironment").expect("the end of the environment block");
    let mut vars = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in MODULE[start..end].lines().skip(2) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, mut value) = match current.take() {
            Some((name, value)) if value.is_empty() => (name, line.to_owned()),
            Some((name, value)) => (name, value + " " + line),
            // `NAME =` alone on its line: nixfmt put the value on the next.
            None => match (line.split_once(" = "), line.strip_suffix(" =")) {
                (Some((name, value)), _) => (name.to_owned(), value.to_owned()),
                (None, Some(name)) => (name.to_owned(), String::new()),
                (None, None) => continue,
            },
        };
        if value.ends_with(';') {
            value.pop();
            vars.insert(name, value);
        } else {
            current = Some((name, value));
        }
    }
    assert!(vars.len() > 20, "the environment block was not read: {vars:?}");
    vars
}

/// Option path (`mqtt.keepalive`) to its type expression, from the `options` block.
fn option_types() -> BTreeMap<String, String> {
    let start = MODULE.find("options.services.mqtt-gateway = {").expect("the options block");
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut types = BTreeMap::new();
    let mut option: Option<(usize, String)> = None;
    let mut type_text: Option<String> = None;
    for line in MODULE[start..].lines().skip(1) {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if let Some(mut t) = type_text.take() {
            t.push(' ');
            t.push_str(text);
            if text.ends_with(';') {
                let (_, name) = option.as_ref().expect("a type inside an option");
                types.insert(name.clone(), t.trim_end_matches(';').to_owned());
            } else {
                type_text = Some(t);
            }
            continue;
        }
        if let Some((option_indent, name)) = &option {
            if text == "};" && indent == *option_indent {
                option = None;
            } else if let Some(t) = text.strip_prefix("type = ") {
                if t.ends_with(';') {
                    types.insert(name.clone(), t.trim_end_matches(';').to_owned());
                } else {
                    type_text = Some(t.to_owned());
                }
            }
            continue;
        }
        let qualified =
            |name: &str| path.iter().map(|(_, p)| p.as_str()).chain([name]).collect::<Vec<_>>().join(".");
        if text == "};" {
            match path.pop() {
                Some((open_indent, _)) => assert_eq!(open_indent, indent, "unbalanced options block"),
                None => break,
            }
        } else if let Some(name) = text.strip_suffix(" = mkOption {") {
            option = Some((indent, qualified(name)));
        } else if let Some((name, _)) = text.split_once(" = mkEnableOption") {
            types.insert(qualified(name), "types.bool".to_owned());
        } else if let Some(name) = text.strip_suffix(" = {") {
            path.push((indent, name.to_owned()));
        }
    }
    assert!(types.len() > 30, "the options block was not read: {types:?}");
    types
}

/// The values a type admits at its edges, as Nix values (`Int` or `Str`), null left out.
#[derive(Debug, Clone)]
enum Value {
    Int(i64),
    Bool(bool),
    Str(String),
}

fn samples(ty: &str) -> Vec<Value> {
    let ty = ty.trim();
    if let Some(inner) = ty.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        return samples(inner);
    }
    if let Some(inner) = ty.strip_prefix("types.nullOr ") {
        return samples(inner);
    }
    let ints = |low: i64, high: i64| vec![Value::Int(low), Value::Int(high)];
    let strs = |s: &[&str]| s.iter().map(|s| Value::Str((*s).to_owned())).collect();
    match ty {
        "types.bool" => vec![Value::Bool(true), Value::Bool(false)],
        "types.port" | "types.ints.u16" => ints(0, 65_535),
        "types.ints.u8" => ints(0, 255),
        "types.ints.u32" => ints(0, 4_294_967_295),
        "types.ints.positive" => ints(1, i64::MAX),
        "types.ints.unsigned" => ints(0, i64::MAX),
        "types.int" => ints(i64::MIN, i64::MAX),
        "types.str" => strs(&["", "x", "a/b+#", " spaced "]),
        "types.nonEmptyStr" => strs(&["x", "a/b+#", " x "]),
        "types.path" => strs(&["/etc/ssl/a.pem", "/nix/store/0000000000000000000000000000000-a.pem"]),
        "secretPath" => strs(&["/run/secrets/a"]),
        // The module's `socketAddress`: the extremes of both forms and of the port.
        "socketAddress" => strs(&[
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "127.0.0.1:9464",
            "[::]:9464",
            "[::1]:1",
            "[fe80::1]:80",
        ]),
        _ => {
            if let Some(range) = ty.strip_prefix("types.ints.between ") {
                let (low, high) = range.split_once(' ').expect("between LOW HIGH");
                return ints(low.parse().unwrap(), high.parse().unwrap());
            }
            if let Some(list) = ty.strip_prefix("types.enum [").and_then(|l| l.strip_suffix(']')) {
                return list
                    .split_whitespace()
                    .map(|item| match item.parse() {
                        Ok(n) => Value::Int(n),
                        Err(_) => Value::Str(item.trim_matches('"').to_owned()),
                    })
                    .collect();
            }
            if let Some(pattern) = ty.strip_prefix("types.strMatching \"").and_then(|p| p.strip_suffix('"')) {
                let long: Vec<String> = (190..=202).map(|n| "x".repeat(n)).collect();
                let probes = ["x", "gateways", "a b", "a/b", "a+b", "#", ""];
                return probes
                    .into_iter()
                    .chain(long.iter().map(String::as_str))
                    .filter(|p| matches_class(pattern, p))
                    .map(|p| Value::Str(p.to_owned()))
                    .collect();
            }
            panic!("the test does not know the option type `{ty}`: teach `samples`")
        }
    }
}

/// Whole-string match of the regex shapes the module uses: one class (`[...]`, `[^...]` or
/// `.`) repeated `+` or `{LOW,HIGH}` times.
fn matches_class(pattern: &str, s: &str) -> bool {
    let unknown = || -> ! { panic!("the test does not know the pattern {pattern:?}: teach `matches_class`") };
    let (class, rest) = match pattern.strip_prefix('[') {
        Some(p) => p.split_once(']').unwrap_or_else(|| unknown()),
        None => pattern.split_at(pattern.strip_prefix('.').map_or_else(|| unknown(), |_| 1)),
    };
    let (low, high) = match rest {
        "+" => (1, usize::MAX),
        _ => rest
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .and_then(|r| r.split_once(','))
            .and_then(|(l, h)| Some((l.parse().ok()?, h.parse().ok()?)))
            .unwrap_or_else(|| unknown()),
    };
    let admits = |c: char| match class {
        "." => c != '\n',
        _ => match class.strip_prefix('^') {
            Some(chars) => !chars.contains(c),
            None => class.contains(c),
        },
    };
    (low..=high).contains(&s.chars().count()) && s.chars().all(admits)
}

/// The string the module puts in the unit for `value`, through `expression`'s rendering.
fn render(expression: &str, value: &Value) -> String {
    let wrapper = expression.trim().split("cfg.").next().unwrap_or("").trim();
    match (wrapper, value) {
        ("toString", Value::Int(n)) => n.to_string(),
        ("toString", Value::Bool(b)) => if *b { "1" } else { "" }.to_owned(),
        ("toString" | "" | "\"${", Value::Str(s)) => s.clone(),
        ("lib.boolToString", Value::Bool(b)) => b.to_string(),
        _ => panic!("the test does not know how `{expression}` renders {value:?}: teach `render`"),
    }
}

/// The option paths whose values become the variable: the branches of an `if`, or the whole
/// expression; a `cfg.` reference only in a condition chooses, it is not rendered.
fn sources(expression: &str) -> Vec<(String, String)> {
    let branches: Vec<&str> = match expression.strip_prefix("if ") {
        Some(rest) => {
            let (_, branches) = rest.split_once(" then ").expect("if ... then");
            let (then, otherwise) = branches.split_once(" else ").expect("then ... else");
            vec![then, otherwise]
        }
        None => vec![expression],
    };
    branches
        .into_iter()
        .filter_map(|branch| {
            let (_, rest) = branch.split_once("cfg.")?;
            let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '.').collect();
            Some((path, branch.trim().to_owned()))
        })
        .collect()
}

fn base() -> Vec<(String, String)> {
    [("DB_HOST", "db"), ("DB_NAME", "gw"), ("DB_USER", "gw"), ("DB_PASSWORD", "pw")]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn every_value_an_option_type_admits_is_accepted_by_the_binary() {
    let types = option_types();
    let mut checked = 0;
    for (var, expression) in environment() {
        for (option, branch) in sources(&expression) {
            let ty = types
                .get(&option)
                .unwrap_or_else(|| panic!("{var} reads cfg.{option}, which is not declared"));
            for value in samples(ty) {
                let rendered = render(&branch, &value);
                if READ_ELSEWHERE.iter().any(|(name, _)| *name == var) {
                    continue;
                }
                let mut vars = base();
                vars.retain(|(k, _)| *k != var);
                vars.push((var.clone(), rendered.clone()));
                for (_, companions) in COMPANIONS.iter().filter(|(name, _)| *name == var) {
                    vars.extend(companions.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
                }
                match Settings::from_vars(vars) {
                    Err(error)
                        if READ_AT_START.contains(&var.as_str())
                            && error.to_string().starts_with(&format!("invalid environment variable {var}: cannot read {rendered}:")) => {}
                    Ok(_) => {}
                    Err(error) => panic!("services.mqtt-gateway.{option} ({ty}) admits {value:?}, rendered {var}={rendered:?}, which the gateway refuses: {error}"),
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 40, "only {checked} values checked");
}

#[test]
fn every_variable_the_module_sets_is_read_by_the_binary() {
    for var in environment().keys() {
        let field = format!("    {}:", var.to_ascii_lowercase());
        let elsewhere = READ_ELSEWHERE.iter().any(|(name, _)| name == var);
        assert!(
            elsewhere || CONFIG.contains(&field),
            "the module sets {var}, which src/config.rs does not read"
        );
    }
}

#[test]
fn the_parsers_of_this_test_see_what_the_module_says() {
    // Guards the text parsing above: known facts of the module must come out of it.
    let types = option_types();
    assert_eq!(types["mqtt.keepalive"], "types.ints.u16");
    assert_eq!(types["mqtt.tls.enable"], "types.bool");
    assert_eq!(types["database.port"], "types.ints.between 1 65535");
    let env = environment();
    assert_eq!(
        sources(&env["MQTT_KEEPALIVE"]),
        [("mqtt.keepalive".to_owned(), "toString cfg.mqtt.keepalive".to_owned())]
    );
    assert_eq!(sources(&env["DB_PORT"])[0].0, "database.port");
    assert_eq!(
        sources(&env["MQTT_CLIENT_CERT"])[0].0,
        "mqtt.tls.clientCertFile",
        "a value on the line after its name is read"
    );
    assert!(
        sources(&env["MQTT_CLIENT_KEY"]).is_empty(),
        "the key's path is a constant; the option only chooses"
    );
    assert!(!matches_class("[^/+#]+", "a/b") && matches_class("[^/+#]+", "gateways"));
    assert!(
        matches_class("[^/+#]{1,200}", &"g".repeat(200)) && !matches_class("[^/+#]{1,200}", &"g".repeat(201))
    );
    assert!(matches_class(".{1,191}", "a b") && !matches_class(".{1,191}", ""));
    assert_eq!(sources(&env["MQTT_SESSION_EXPIRY_SECONDS"])[0].0, "mqtt.sessionExpiry");
    assert_eq!(samples(&types["mqtt.protocol"]).len(), 2, "{}", types["mqtt.protocol"]);
    // The options added for settings that once had none.
    assert_eq!(sources(&env["OUTBOX_LEASE_SECONDS"])[0].0, "outbox.lease");
    assert_eq!(sources(&env["HTTP_CA_FILE"])[0].0, "http.caFile");
    assert_eq!(sources(&env["DB_SSL_MODE"])[0].0, "database.tls.mode");
    assert_eq!(sources(&env["DB_SSL_CA"])[0].0, "database.tls.caFile");
    assert_eq!(sources(&env["DB_SSL_CERT"])[0].0, "database.tls.clientCertFile");
    assert!(sources(&env["DB_SSL_KEY"]).is_empty(), "the key's path is a constant (a credential)");
    assert_eq!(samples(&types["database.tls.mode"]).len(), 5, "{}", types["database.tls.mode"]);
    assert_eq!(types["database.tls.clientKeyFile"], "types.nullOr secretPath");
}

#[test]
fn secrets_of_the_module_are_credentials_never_variables() {
    // A key's variable points into the credentials directory; the option names the file that
    // systemd reads into it.
    let env = environment();
    for (var, credential, option) in [
        ("MQTT_CLIENT_KEY", "mqtt-client-key", "cfg.mqtt.tls.clientKeyFile"),
        ("DB_SSL_KEY", "db-client-key", "cfg.database.tls.clientKeyFile"),
    ] {
        assert!(env[var].contains(&format!("\"%d/{credential}\"")), "{var} = {}", env[var]);
        assert!(
            MODULE.contains(&format!("credential \"{credential}\" {option}")),
            "{option} is not passed with LoadCredential as {credential}"
        );
    }
}
