//! The committed CustomResourceDefinition (`crds/` and the chart's `crds/` folder) is what
//! `crdgen` generates now, and it says what the issue asks of it: names, scope, the status
//! and scale subresources, printer columns, and the schema rules the API server enforces.
//!
//! After changing the types: `cargo run -p hotprefix-operator --bin crdgen --
//! crds/hotprefixservices.hotprefix.dev.yaml charts/hotprefix/crds/hotprefixservices.hotprefix.dev.yaml`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use hotprefix_operator::crd;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};

const FILE: &str = "hotprefixservices.hotprefix.dev.yaml";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crds_match_crdgen() {
    let generated = crd::definition_yaml().unwrap();
    for dir in ["crds", "charts/hotprefix/crds"] {
        let path = root().join(dir).join(FILE);
        let committed =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == generated,
            "{} is stale: regenerate it with `cargo run -p hotprefix-operator --bin crdgen -- \
             crds/{FILE} charts/hotprefix/crds/{FILE}`",
            path.display()
        );
    }
}

fn committed() -> CustomResourceDefinition {
    let text = std::fs::read_to_string(root().join("crds").join(FILE)).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn prop<'a>(s: &'a JSONSchemaProps, path: &[&str]) -> &'a JSONSchemaProps {
    path.iter().fold(s, |s, p| {
        s.properties
            .as_ref()
            .and_then(|m| m.get(*p))
            .unwrap_or_else(|| panic!("no property {p}"))
    })
}

fn rules(s: &JSONSchemaProps) -> Vec<String> {
    s.x_kubernetes_validations
        .iter()
        .flatten()
        .map(|r| r.rule.clone())
        .collect()
}

#[test]
fn the_crd_has_its_names_subresources_and_columns() {
    let crd = committed();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("hotprefixservices.hotprefix.dev")
    );
    let s = &crd.spec;
    assert_eq!(
        (s.group.as_str(), s.scope.as_str()),
        ("hotprefix.dev", "Namespaced")
    );
    assert_eq!(s.names.kind, "HotPrefixService");
    assert_eq!(
        s.names.short_names.as_deref(),
        Some(&["hps".to_string()][..])
    );
    let v = &s.versions[0];
    assert_eq!(
        (v.name.as_str(), v.served, v.storage),
        ("v1alpha1", true, true)
    );
    let sub = v.subresources.as_ref().unwrap();
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.engine.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<&str> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    for c in ["Ready", "Replicas", "Endpoint", "Age"] {
        assert!(columns.contains(&c), "{columns:?}");
    }
}

#[test]
fn the_schema_enforces_what_the_api_server_can() {
    let crd = committed();
    let root = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    assert!(
        rules(root)
            .iter()
            .any(|r| r.contains("self.metadata.name.size() <= 40"))
    );
    let spec = prop(root, &["spec"]);
    assert_eq!(spec.required.as_deref(), Some(&["model".to_string()][..]));
    // Replicas cannot go negative.
    assert_eq!(prop(spec, &["engine", "replicas"]).minimum, Some(0.0));
    assert_eq!(prop(spec, &["router", "replicas"]).minimum, Some(0.0));
    // Exactly one model source, exactly one kind of Redis; an external one needs its URL.
    let source = prop(spec, &["model", "source"]);
    assert_eq!(source.one_of.as_ref().unwrap().len(), 4);
    let redis = prop(spec, &["redis"]);
    assert_eq!(redis.one_of.as_ref().unwrap().len(), 2);
    let external = prop(redis, &["external"]);
    assert_eq!(external.required.as_deref(), Some(&["url".to_string()][..]));
    assert!(rules(external).iter().any(|r| r.contains("rediss://")));
    assert!(
        rules(prop(spec, &["engine"]))
            .iter()
            .any(|r| r.contains("self.gpus > 0"))
    );
    assert!(
        rules(prop(spec, &["engine", "batching"]))
            .iter()
            .any(|r| r.contains("maxBatchTokens"))
    );
    assert_eq!(
        prop(spec, &["engine", "cache", "policy"])
            .enum_
            .as_ref()
            .unwrap()
            .len(),
        4
    );
    // A chat template is bounded (it travels in a ConfigMap) and optional.
    let template = prop(spec, &["model", "chatTemplate"]);
    assert_eq!(template.max_length, Some(crd::MAX_CHAT_TEMPLATE_LEN as i64));
    assert_eq!(template.min_length, Some(1));
    assert!(
        !prop(spec, &["model"])
            .required
            .iter()
            .flatten()
            .any(|r| r == "chatTemplate")
    );
    // Embedded Kubernetes types keep their structure but not their long descriptions.
    let affinity = prop(spec, &["engine", "affinity"]);
    assert!(affinity.description.is_some());
    assert!(prop(affinity, &["nodeAffinity"]).description.is_none());
}

#[test]
fn both_examples_are_hotprefix_services() {
    for name in ["minimal", "full"] {
        let text =
            std::fs::read_to_string(root().join("examples").join(format!("{name}.yaml"))).unwrap();
        hotprefix_operator::render::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
