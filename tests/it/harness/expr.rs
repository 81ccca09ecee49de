//! The one writer of Nix expression text for test derivations (the tests and benches/hook):
//! `derivation { … }` without nixpkgs, built by busybox's `/bin/sh -c SCRIPT` (the sandbox's
//! `/bin/sh`), and `rec { … }` sets of them.
//!
//! Owns: the attribute layout every fake derivation shares (name, system, builder, args) and the
//! quoting of strings into Nix ([`nix_str`]), so a script or value reaches the builder byte for
//! byte whatever it contains.
//!
//! Must never: run anything, or put a caller's text into an expression unquoted, except where
//! the caller asks for a Nix expression by name ([`DrvExpr::attr`], [`DrvExpr::named_by`]).

/// A Nix string literal holding exactly `s`: `\`, `"` and `${` are escaped.
pub fn nix_str(s: &str) -> String {
    let escaped = s
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace("${", "\\${");
    format!("\"{escaped}\"")
}

/// A Nix list of string literals, `[ "a" "b" ]`.
pub fn nix_list(items: &[&str]) -> String {
    let mut s = String::from("[");
    for i in items {
        s.push(' ');
        s.push_str(&nix_str(i));
    }
    s + " ]"
}

/// One `derivation { … }`. Start from [`DrvExpr::sh`] (or [`DrvExpr::named_by`]) and add
/// attributes; [`DrvExpr::nix`] writes it.
#[derive(Clone, Debug)]
pub struct DrvExpr {
    /// `name = …;`, `inherit …;`: in the order they were added.
    lines: Vec<String>,
    system: String,
    script: String,
    busybox: bool,
}

impl DrvExpr {
    /// A derivation named `name` for `system`, built by `/bin/sh -c script`.
    pub fn sh(name: &str, system: &str, script: &str) -> Self {
        Self::named_by(&nix_str(name), system, script)
    }

    /// [`DrvExpr::sh`] with the name given as a Nix expression (`name` inside a function
    /// `name: derivation …`, or `"p-${toString i}"`).
    pub fn named_by(name_expr: &str, system: &str, script: &str) -> Self {
        DrvExpr {
            lines: vec![format!("name = {name_expr};")],
            system: system.to_owned(),
            script: script.to_owned(),
            busybox: false,
        }
    }

    /// `<name>-input`, an x86_64-linux derivation built by `script` and built locally first
    /// (`preferLocalBuild`): the input of a test derivation for another system.
    pub fn local_input(name: &str, script: &str) -> Self {
        Self::sh(&format!("{name}-input"), "x86_64-linux", script).prefer_local()
    }

    /// Built by `/bin/busybox sh -c script` instead: for a store without a sandbox (no
    /// `/bin/sh` mapped to busybox), where busybox's `sh` finds its applets without a PATH.
    pub fn busybox(mut self) -> Self {
        self.busybox = true;
        self
    }

    /// `key = EXPR;` with `expr` a Nix expression, as is.
    pub fn attr(mut self, key: &str, expr: &str) -> Self {
        self.lines.push(format!("{key} = {expr};"));
        self
    }

    /// `key = "value";`.
    pub fn string(self, key: &str, value: &str) -> Self {
        self.attr(key, &nix_str(value))
    }

    /// `inherit NAME;`: an attribute of the enclosing `rec` set or `let` (an input).
    pub fn inherit(mut self, name: &str) -> Self {
        self.lines.push(format!("inherit {name};"));
        self
    }

    /// `key = builtins.storePath "path";`: an input that is already in the store.
    pub fn store_path(self, key: &str, path: &str) -> Self {
        self.attr(key, &format!("builtins.storePath {}", nix_str(path)))
    }

    /// `outputs = [ … ];`.
    pub fn outputs(self, outputs: &[&str]) -> Self {
        self.attr("outputs", &nix_list(outputs))
    }

    /// `requiredSystemFeatures = [ … ];`.
    pub fn features(self, features: &[&str]) -> Self {
        self.attr("requiredSystemFeatures", &nix_list(features))
    }

    /// `preferLocalBuild = true;` (no hook is asked while the daemon has `max-jobs > 0`).
    pub fn prefer_local(self) -> Self {
        self.attr("preferLocalBuild", "true")
    }

    /// The expression `derivation { … }`.
    pub fn nix(&self) -> String {
        self.nix_at(0)
    }

    /// The expression, its inner lines indented by `indent + 2`.
    fn nix_at(&self, indent: usize) -> String {
        let pad = " ".repeat(indent + 2);
        let (builder, args) = if self.busybox {
            ("/bin/busybox", nix_list(&["sh", "-c", &self.script]))
        } else {
            ("/bin/sh", nix_list(&["-c", &self.script]))
        };
        let mut lines = vec![self.lines[0].clone()];
        lines.push(format!("system = {};", nix_str(&self.system)));
        lines.push(format!("builder = {};", nix_str(builder)));
        lines.extend(self.lines[1..].iter().cloned());
        lines.push(format!("args = {args};"));
        let mut s = String::from("derivation {\n");
        for l in lines {
            s += &format!("{pad}{l}\n");
        }
        s + &" ".repeat(indent) + "}"
    }
}

/// `rec { NAME = derivation { … }; … }`: derivations that name each other (`inherit input;`).
pub fn rec_set(drvs: &[(&str, &DrvExpr)]) -> String {
    let mut s = String::from("rec {\n");
    for (name, d) in drvs {
        s += &format!("  {name} = {};\n", d.nix_at(2));
    }
    s + "}\n"
}
