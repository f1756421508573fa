// Validates custom resources (Argo Rollouts, Gateway API, Prometheus Operator) with the
// @kubernetes-models runtime validators (types, enums, required fields, patterns). Unknown
// fields are refused separately, by tsc over the same documents (deploy/tests/test_static.py):
// these validators accept them. Input: one JSON document per line on stdin; exit 1 if any
// document is invalid or of a kind without a model.
import * as argo from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1";
import * as gateway from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { createInterface } from "node:readline";

const groups = {
  "argoproj.io/v1alpha1": argo,
  "gateway.networking.k8s.io/v1": gateway,
  "monitoring.coreos.com/v1": monitoring,
};

let failed = 0;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const doc = JSON.parse(line);
  const Model = groups[doc.apiVersion]?.[doc.kind];
  const name = `${doc.kind}/${doc.metadata?.name}`;
  if (!Model) {
    console.error(`FAIL ${name}: no model for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`ok   ${name} (${doc.apiVersion})`);
  } catch (err) {
    console.error(`FAIL ${name}: ${err.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
