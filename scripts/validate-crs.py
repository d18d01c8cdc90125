#!/usr/bin/env python3
"""Validates custom resources against their CustomResourceDefinition's schema, as the API
server would on `kubectl apply --validate=strict`: the structural schema (types, required
fields, enums, bounds, patterns, one-of, no unknown fields) after applying the schema's
defaults, then every CEL rule (x-kubernetes-validations) with cel-python.

Usage: validate-crs.py CRD.yaml RESOURCE.yaml...   (exit status 1 when anything is invalid)
Run by scripts/check-manifests.sh with the .venv scripts/setup-validate.sh prepares.
"""

import copy
import sys

import celpy
import jsonschema
import yaml


def to_json_schema(s):
    """An OpenAPI v3 structural schema as JSON Schema 2020-12."""
    out = {}
    for key in ("type", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
                "required", "minItems", "maxItems", "minProperties", "maxProperties"):
        if key in s:
            out[key] = s[key]
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in s:
        out["properties"] = {k: to_json_schema(v) for k, v in s["properties"].items()}
        if not s.get("x-kubernetes-preserve-unknown-fields"):
            # The API server prunes unknown fields; strict validation refuses them.
            out["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(s["additionalProperties"])
    if "items" in s:
        out["items"] = to_json_schema(s["items"])
    for key in ("oneOf", "anyOf", "allOf"):
        if key in s:
            out[key] = [to_json_schema(x) for x in s[key]]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def apply_defaults(schema, value):
    """Fills in defaults as the API server does before validating (recursively)."""
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                apply_defaults(prop, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for v in value.values():
                apply_defaults(extra, v)
    elif isinstance(value, list) and "items" in schema:
        for v in value:
            apply_defaults(schema["items"], v)


def as_typed(schema, value):
    """`value` with the numbers of `type: number` fields as floats: the API server hands CEL a
    double for them even when the YAML wrote an integer (`hotSpotFactor: 2`)."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: as_typed(props.get(k) or (extra if isinstance(extra, dict) else {}), v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [as_typed(schema.get("items", {}), v) for v in value]
    return value


CEL = celpy.Environment()


def cel_errors(schema, value, path):
    """The CEL rules of `schema` and of its nested schemas that `value` breaks."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = CEL.program(CEL.compile(rule["rule"]))
        try:
            ok = program.evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as e:
            errors.append(f"{path}: rule {rule['rule']!r} failed to evaluate: {e}")
            continue
        if not bool(ok):
            errors.append(f"{path}: {rule.get('message') or rule['rule']}")
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in value and value[name] is not None:
                errors += cel_errors(prop, value[name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += cel_errors(schema["items"], v, f"{path}[{i}]")
    return errors


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        crd = next(d for d in yaml.safe_load_all(f) if d)
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    versions = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
    failed = False
    for path in argv[2:]:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            name = doc.get("metadata", {}).get("name", "?")
            what = f"{path}: {doc.get('kind')}/{name}"
            api_version = doc.get("apiVersion", "")
            version = api_version.split("/", 1)[-1]
            if doc.get("kind") != kind or not api_version.startswith(group + "/"):
                print(f"ERROR {what}: not a {kind} of {group}")
                failed = True
                continue
            if version not in versions:
                print(f"ERROR {what}: {group} serves no version {version}")
                failed = True
                continue
            schema = versions[version]
            obj = copy.deepcopy(doc)
            apply_defaults(schema, obj)
            root = to_json_schema(schema)
            # Every object has these; CRD schemas may leave them out.
            for field, t in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
                root.setdefault("properties", {}).setdefault(field, {"type": t})
            validator = jsonschema.Draft202012Validator(root)
            errors = [
                f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                for e in validator.iter_errors(obj)
            ]
            if not errors:
                errors = cel_errors(schema, as_typed(schema, obj), "(root)")
            if errors:
                failed = True
                for e in errors:
                    print(f"ERROR {what}: {e}")
            else:
                print(f"INFO {what} is valid against {argv[1]} ({version})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
