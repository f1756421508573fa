// Validates custom resources (Argo Rollouts, Gateway API, Prometheus Operator) against the
// @kubernetes-models schemas, and refuses fields their schemas do not declare (the models alone
// accept unknown fields; the API server would prune or reject them). Input: one JSON document
// per line on stdin. Exits 1 if any document is invalid or of an unknown kind.
import * as argo from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1";
import * as gateway from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { createInterface } from "node:readline";

const require = createRequire(import.meta.url);
const groups = {
  "argoproj.io/v1alpha1": [argo, "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1"],
  "gateway.networking.k8s.io/v1": [gateway, "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1"],
  "monitoring.coreos.com/v1": [monitoring, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1"],
};

// The generated model files hold their JSON schema as `const schema = {...};`.
function schemaOf(modulePath, kind) {
  const source = readFileSync(require.resolve(`${modulePath}/${kind}.js`), "utf8");
  const match = source.match(/const schema = (\{[\s\S]*?\n\});\n/);
  if (!match) throw new Error(`no schema found in ${modulePath}/${kind}.js`);
  return JSON.parse(match[1]);
}

// Every object key must be declared where the schema lists properties and does not allow more.
function unknownFields(doc, schema, path, out) {
  if (!schema || typeof doc !== "object" || doc === null) return out;
  if (Array.isArray(doc)) {
    doc.forEach((item, i) => unknownFields(item, schema.items, `${path}[${i}]`, out));
    return out;
  }
  const props = schema.properties;
  if (!props) return out; // $ref to core types (metadata), maps, preserve-unknown-fields
  const open = schema.additionalProperties || schema["x-kubernetes-preserve-unknown-fields"];
  for (const [key, value] of Object.entries(doc)) {
    if (key in props) unknownFields(value, props[key], `${path}.${key}`, out);
    else if (!open) out.push(`${path}.${key}`);
  }
  return out;
}

let failed = 0;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const doc = JSON.parse(line);
  const [group, modulePath] = groups[doc.apiVersion] || [];
  const Model = group && group[doc.kind];
  const name = `${doc.kind}/${doc.metadata?.name}`;
  if (!Model) {
    console.error(`FAIL ${name}: no model for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
    const unknown = unknownFields(doc, schemaOf(modulePath, doc.kind), doc.kind, []);
    if (unknown.length) throw new Error(`unknown fields: ${unknown.join(", ")}`);
    console.log(`ok   ${name} (${doc.apiVersion})`);
  } catch (err) {
    console.error(`FAIL ${name}: ${err.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
