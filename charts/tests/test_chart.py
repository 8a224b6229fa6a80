"""Lints and renders charts/chat with Helm's own engine (the helm-python-sdk wheel bundles
Helm's Go SDK), then checks the rendered manifests for what operators rely on.

Run by scripts/test.sh: .venv/bin/python -m unittest discover -s charts/tests -v
"""

import itertools
import json
import pathlib
import re
import tomllib
import unittest

import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "chat"

# Per component: binary, env prefix, NATS user, drain steps (each bounded by
# shutdown_grace_ms; the services' READMEs, "Shutdown"), ports besides admin.
COMPONENTS = {
    "gateway": ("gateway", "CHAT_GATEWAY", "gateway", 4, {"ws": 8080}),
    "sequencer": ("sequencer", "CHAT_SEQUENCER", "sequencer", 3, {}),
    "fanout-worker": ("fanout-worker", "CHAT_FANOUT", "fanout", 4, {}),
    "media": ("media", "CHAT_MEDIA", "media", 4, {"http": 8070}),
    "presence": ("presence", "CHAT_PRESENCE", "presence", 2, {}),
}
README = {
    "CHAT_GATEWAY": "gateway/README.md",
    "CHAT_SEQUENCER": "sequencer/README.md",
    "CHAT_FANOUT": "fanout-worker/README.md",
    "CHAT_MEDIA": "media/README.md",
    "CHAT_PRESENCE": "presence/README.md",
}
BASE = {"jwt": {"hs256Secret": "ci-only-secret"}}


def render(values=None, name="chat"):
    """Every manifest of a render, as parsed documents."""
    merged = json.loads(json.dumps(BASE))
    deep_merge(merged, values or {})
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(merged, name=name, namespace="chat", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__file"] = path
                docs.append(doc)
    return docs


def deep_merge(into, extra):
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_merge(into[k], v)
        else:
            into[k] = v


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(workload):
    return workload["spec"]["template"]["spec"]["containers"][0]


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def rust_sources():
    text = []
    for path in ROOT.glob("*/src/**/*.rs"):
        if "target" not in path.parts:
            text.append(path.read_text())
    return "\n".join(text)


class Lint(unittest.TestCase):
    def test_lint_is_clean_in_strict_mode(self):
        for values in (BASE, {"jwt": {"rs256PublicKey": "PEM"}, "sequencer": {"persistence": {"enabled": True}}}):
            report = helm.lint(str(CHART), values, strict=True)
            self.assertEqual(report["errors"], [], report)
            bad = [m for m in report["messages"] if m["severity"] >= 2]
            self.assertEqual(bad, [], report)


class Workloads(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.docs = render()
        cls.deployments = by_kind(cls.docs, "Deployment")
        cls.hpas = by_kind(cls.docs, "HorizontalPodAutoscaler")
        cls.pdbs = by_kind(cls.docs, "PodDisruptionBudget")
        cls.auth_conf = (ROOT / "nats" / "auth.conf").read_text()

    def test_one_deployment_per_component_with_its_binary(self):
        self.assertEqual(sorted(self.deployments), sorted(f"chat-{c}" for c in COMPONENTS))
        for comp, (binary, *_rest) in COMPONENTS.items():
            c = container(self.deployments[f"chat-{comp}"])
            self.assertEqual(c["command"], [f"/usr/local/bin/{binary}"])

    def test_probes_hit_the_admin_endpoint(self):
        for comp in COMPONENTS:
            c = container(self.deployments[f"chat-{comp}"])
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            self.assertEqual(ports["admin"], 9090, comp)
            self.assertEqual(c["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "admin"})
            self.assertEqual(c["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "admin"})
            self.assertIn("startupProbe", c)
            for name, port in COMPONENTS[comp][4].items():
                self.assertEqual(ports[name], port, comp)
            e = env_of(c)
            prefix = COMPONENTS[comp][1]
            self.assertEqual(e[f"{prefix}_ADMIN_LISTEN"]["value"], "0.0.0.0:9090")
            pod = self.deployments[f"chat-{comp}"]["spec"]["template"]["metadata"]
            self.assertEqual(pod["annotations"]["prometheus.io/port"], "9090")

    def test_resources_and_security(self):
        for comp in COMPONENTS:
            d = self.deployments[f"chat-{comp}"]
            c = container(d)
            self.assertIn("cpu", c["resources"]["requests"], comp)
            self.assertIn("memory", c["resources"]["limits"], comp)
            self.assertTrue(c["securityContext"]["readOnlyRootFilesystem"])
            self.assertTrue(d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"])

    def test_termination_grace_covers_the_drain(self):
        for comp, (_b, prefix, _u, steps, _p) in COMPONENTS.items():
            spec = self.deployments[f"chat-{comp}"]["spec"]["template"]["spec"]
            c = spec["containers"][0]
            grace_ms = int(env_of(c)[f"{prefix}_SHUTDOWN_GRACE_MS"]["value"])
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            need = pre_stop + steps * grace_ms / 1000
            self.assertGreaterEqual(spec["terminationGracePeriodSeconds"], need, comp)
        # The gateway waits for the load balancer before it stops accepting.
        gw = container(self.deployments["chat-gateway"])
        self.assertGreater(gw["lifecycle"]["preStop"]["sleep"]["seconds"], 0)

    def test_a_grace_period_shorter_than_the_drain_is_refused(self):
        with self.assertRaises(Exception) as err:
            render({"gateway": {"terminationGracePeriodSeconds": 5}})
        self.assertIn("shorter than its drain", str(err.exception))

    def test_autoscalers_and_disruption_budgets_target_their_component(self):
        for comp in COMPONENTS:
            name = f"chat-{comp}"
            selector = self.deployments[name]["spec"]["selector"]["matchLabels"]
            labels = self.deployments[name]["spec"]["template"]["metadata"]["labels"]
            self.assertLessEqual(selector.items(), labels.items())
            pdb = self.pdbs[name]
            self.assertEqual(pdb["spec"]["selector"]["matchLabels"], selector)
            self.assertEqual(pdb["spec"]["maxUnavailable"], 1)
        for name, hpa in self.hpas.items():
            self.assertEqual(hpa["apiVersion"], "autoscaling/v2")
            self.assertEqual(hpa["spec"]["scaleTargetRef"]["name"], name)
            self.assertIn(name, self.deployments)
            # With an HPA the Deployment leaves replicas to it.
            self.assertNotIn("replicas", self.deployments[name]["spec"])
        self.assertEqual(
            sorted(self.hpas), ["chat-fanout-worker", "chat-gateway", "chat-media"]
        )
        for name in ("chat-sequencer", "chat-presence"):
            self.assertEqual(self.deployments[name]["spec"]["replicas"], 2)
        # More sequencers than partitions would idle.
        scaled = by_kind(render({"sequencer": {"autoscaling": {"enabled": True}}}), "HorizontalPodAutoscaler")
        self.assertLessEqual(scaled["chat-sequencer"]["spec"]["maxReplicas"], 16)

    def test_each_service_logs_in_as_its_own_nats_user(self):
        declared = set(re.findall(r"user:\s*(\w+)", self.auth_conf))
        for comp, (_b, prefix, user, _s, _p) in COMPONENTS.items():
            e = env_of(container(self.deployments[f"chat-{comp}"]))
            self.assertEqual(e[f"{prefix}_NATS_AUTH__USER"]["value"], user)
            self.assertIn(user, declared)
            ref = e[f"{prefix}_NATS_AUTH__PASSWORD"]["valueFrom"]["secretKeyRef"]
            self.assertEqual(ref, {"name": "chat-nats-auth", "key": user})

    def test_no_secret_value_is_written_into_a_workload(self):
        for d in self.deployments.values():
            for e in container(d)["env"]:
                if re.search(r"PASSWORD|SECRET(?!_ACCESS_KEY_FILE)", e["name"]):
                    self.assertNotIn("value", e, e["name"])
        self.assertNotIn("ci-only-secret", json.dumps([d for d in self.docs if d["kind"] != "Secret"]))

    def test_every_env_var_is_a_documented_setting(self):
        tls = by_kind(render({"nats": {"tls": {"enabled": True, "clientCertificate": True}}}), "Deployment")
        for (comp, (_b, prefix, *_r)), deployments in itertools.product(COMPONENTS.items(), (self.deployments, tls)):
            readme = (ROOT / README[prefix]).read_text()
            for name in env_of(container(deployments[f"chat-{comp}"])):
                if not name.startswith(prefix + "_"):
                    continue
                field = name[len(prefix) + 1 :].lower().replace("__", ".")
                top = field.split(".")[0]
                self.assertTrue(
                    f"`{field}`" in readme or f"`{top}`" in readme,
                    f"{name}: `{field}` is not a setting in {README[prefix]} (services refuse unknown keys)",
                )

    def test_services_for_the_gateway_and_media(self):
        services = by_kind(self.docs, "Service")
        gw = services["chat-gateway"]["spec"]
        self.assertEqual(gw["type"], "LoadBalancer")
        self.assertEqual(gw["ports"], [{"name": "ws", "port": 80, "targetPort": "ws", "protocol": "TCP"}])
        self.assertEqual(gw["selector"]["app.kubernetes.io/component"], "gateway")
        media = services["chat-media"]["spec"]
        self.assertEqual(media["ports"][0]["targetPort"], "http")
        self.assertEqual(media["selector"]["app.kubernetes.io/component"], "media")

    def test_a_hook_job_provisions_the_streams_first(self):
        jobs = by_kind(self.docs, "Job")
        job = jobs["chat-provision"]
        ann = job["metadata"]["annotations"]
        self.assertEqual(ann["helm.sh/hook"], "pre-install,pre-upgrade")
        c = container(job)
        self.assertEqual(
            c["command"],
            ["/usr/local/bin/chat", "admin", "provision", "--replicas", "3", "--partitions", "16"],
        )
        e = env_of(c)
        self.assertEqual(e["CHAT_NATS_USER"]["value"], "admin")
        self.assertEqual(e["CHAT_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"], "admin")

    def test_jwt_secret_and_optional_secrets(self):
        secrets = by_kind(self.docs, "Secret")
        self.assertEqual(sorted(secrets), ["chat-jwt"])
        self.assertEqual(secrets["chat-jwt"]["stringData"], {"hs256-secret": "ci-only-secret"})
        docs = render(
            {
                "s3": {"accessKeyId": "AK", "secretAccessKey": "SK"},
                "store": {"backend": "cassandra", "cassandra": {"username": "u", "password": "p"}},
                "jwt": {"hs256Secret": "", "eddsaPublicKey": "PEM"},
            }
        )
        secrets = by_kind(docs, "Secret")
        self.assertEqual(sorted(secrets), ["chat-cassandra", "chat-jwt", "chat-s3"])
        media = container(by_kind(docs, "Deployment")["chat-media"])
        e = env_of(media)
        self.assertEqual(e["CHAT_MEDIA_S3__SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"], "chat-s3")
        self.assertEqual(e["CHAT_MEDIA_AUTH__EDDSA_PUBLIC_KEY_FILE"]["value"], "/etc/chat/jwt/eddsa-public.pem")
        mounts = {m["mountPath"] for m in media["volumeMounts"]}
        self.assertIn("/etc/chat/jwt", mounts)
        seq = container(by_kind(docs, "Deployment")["chat-sequencer"])
        self.assertIn("/etc/chat/cassandra", {m["mountPath"] for m in seq["volumeMounts"]})

    def test_rotation_keys_are_mounted_and_named_by_kid(self):
        keys = [
            {"kid": "2026-06", "alg": "EdDSA", "publicKey": "OLD PEM"},
            {"kid": "2026-12", "alg": "RS256", "publicKey": "NEW PEM"},
        ]
        # Next to the single key (tokens without kid), and alone (every token names its kid).
        for single in ({"eddsaPublicKey": "PEM"}, {"hs256Secret": ""}):
            docs = render({"jwt": {**single, "keys": keys}})
            secret = by_kind(docs, "Secret")["chat-jwt"]["stringData"]
            self.assertEqual(secret["key-2026-06.pem"], "OLD PEM")
            self.assertEqual(secret["key-2026-12.pem"], "NEW PEM")
            for name, prefix in (("chat-gateway", "CHAT_GATEWAY"), ("chat-media", "CHAT_MEDIA")):
                c = container(by_kind(docs, "Deployment")[name])
                e = env_of(c)
                # The services read the list in figment's inline syntax, which is TOML's.
                parsed = tomllib.loads("keys = " + e[f"{prefix}_AUTH__KEYS"]["value"])["keys"]
                self.assertEqual(
                    parsed,
                    [
                        {"kid": "2026-06", "alg": "EdDSA", "public_key_file": "/etc/chat/jwt/key-2026-06.pem"},
                        {"kid": "2026-12", "alg": "RS256", "public_key_file": "/etc/chat/jwt/key-2026-12.pem"},
                    ],
                )
                self.assertIn("/etc/chat/jwt", {m["mountPath"] for m in c["volumeMounts"]})
                self.assertEqual(f"{prefix}_AUTH__EDDSA_PUBLIC_KEY_FILE" in e, "eddsaPublicKey" in single)
        # With an existing secret, each key names the secret's key holding its PEM.
        docs = render({"jwt": {"hs256Secret": "", "existingSecret": "issuer-keys", "keys": [
            {"kid": "k1", "alg": "EdDSA", "secretKey": "k1.pem"}]}})
        self.assertNotIn("chat-jwt", by_kind(docs, "Secret"))
        gw = container(by_kind(docs, "Deployment")["chat-gateway"])
        self.assertIn('public_key_file="/etc/chat/jwt/k1.pem"', env_of(gw)["CHAT_GATEWAY_AUTH__KEYS"]["value"])
        self.assertEqual(
            {v["name"]: v.get("secret", {}).get("secretName") for v in by_kind(docs, "Deployment")["chat-gateway"]["spec"]["template"]["spec"]["volumes"]}["jwt"],
            "issuer-keys",
        )

    def test_a_changed_key_rolls_the_gateways_and_media(self):
        def sums(values):
            deps = by_kind(render(values), "Deployment")
            return {
                n: deps[n]["spec"]["template"]["metadata"]["annotations"].get("checksum/jwt")
                for n in ("chat-gateway", "chat-media", "chat-sequencer")
            }

        before = sums({})
        self.assertIsNone(before["chat-sequencer"])
        self.assertIsNotNone(before["chat-gateway"])
        self.assertNotIn("ci-only-secret", json.dumps(before))
        self.assertEqual(before, sums({}))
        after = sums({"jwt": {"keys": [{"kid": "k", "alg": "EdDSA", "publicKey": "P"}]}})
        for name in ("chat-gateway", "chat-media"):
            self.assertNotEqual(before[name], after[name], name)

    def test_bad_rotation_keys_are_refused_with_the_reason(self):
        cases = [
            ({"alg": "EdDSA", "publicKey": "P"}, "kid is required"),
            ({"kid": "a/b", "alg": "EdDSA", "publicKey": "P"}, "use 1-64 of"),
            ({"kid": "a", "alg": "HS256", "publicKey": "P"}, "RS256 or EdDSA"),
            ({"kid": "a", "alg": "EdDSA"}, "publicKey (the PEM) is required"),
        ]
        for key, reason in cases:
            with self.assertRaises(Exception, msg=key) as err:
                render({"jwt": {"keys": [key]}})
            self.assertIn(reason, str(err.exception), key)
        twice = [{"kid": "a", "alg": "EdDSA", "publicKey": "P"}] * 2
        with self.assertRaises(Exception) as err:
            render({"jwt": {"keys": twice}})
        self.assertIn("appears twice", str(err.exception))
        with self.assertRaises(Exception) as err:
            render({"jwt": {"hs256Secret": "", "existingSecret": "s", "keys": [{"kid": "a", "alg": "EdDSA"}]}})
        self.assertIn("secretKey is required", str(err.exception))
        with self.assertRaises(Exception) as err:
            render({"jwt": {"hs256Secret": ""}})
        self.assertIn("jwt: set one of", str(err.exception))

    def test_nats_tls_mounts_the_secret_in_every_pod_and_names_its_files(self):
        self.assertNotIn("NATS_TLS", json.dumps(self.docs))
        docs = render({"nats": {"url": "tls://nats:4222", "tls": {"enabled": True, "clientCertificate": True}}})
        pods = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "Job")]
        self.assertEqual(len(pods), len(COMPONENTS) + 1)
        for name, pod in pods:
            volumes = {v["name"]: v for v in pod["volumes"]}
            self.assertEqual(volumes["nats-tls"]["secret"]["secretName"], "chat-nats-tls", name)
            c = pod["containers"][0]
            self.assertIn(
                {"name": "nats-tls", "mountPath": "/etc/chat/nats-tls", "readOnly": True}, c["volumeMounts"], name
            )
            e = {k: v.get("value") for k, v in env_of(c).items()}
            if name == "chat-provision":
                want = {"CHAT_NATS_CA": "ca.crt", "CHAT_NATS_CERT": "tls.crt", "CHAT_NATS_KEY": "tls.key"}
            else:
                prefix = next(p for comp, (_b, p, *_r) in COMPONENTS.items() if name == f"chat-{comp}")
                want = {f"{prefix}_NATS_TLS__{k}_FILE": f for k, f in (("CA", "ca.crt"), ("CERT", "tls.crt"), ("KEY", "tls.key"))}
            for var, file in want.items():
                self.assertEqual(e.get(var), f"/etc/chat/nats-tls/{file}", f"{name} {var}")
        # Without a client certificate only the CA is set.
        gw = container(by_kind(render({"nats": {"tls": {"enabled": True}}}), "Deployment")["chat-gateway"])
        self.assertIn("CHAT_GATEWAY_NATS_TLS__CA_FILE", env_of(gw))
        self.assertNotIn("CHAT_GATEWAY_NATS_TLS__CERT_FILE", env_of(gw))

    def test_persistent_sequencers_are_a_statefulset(self):
        docs = render({"sequencer": {"persistence": {"enabled": True, "size": "50Gi"}}})
        sts = by_kind(docs, "StatefulSet")["chat-sequencer"]
        self.assertNotIn("chat-sequencer", by_kind(docs, "Deployment"))
        claim = sts["spec"]["volumeClaimTemplates"][0]
        self.assertEqual(claim["spec"]["resources"]["requests"]["storage"], "50Gi")
        self.assertEqual(by_kind(docs, "PodDisruptionBudget")["chat-sequencer"]["spec"]["maxUnavailable"], 1)

    def test_extra_env_and_fixed_replicas(self):
        docs = render(
            {
                "fanoutWorker": {
                    "autoscaling": {"enabled": False},
                    "replicas": 5,
                    "extraEnv": [{"name": "CHAT_FANOUT_GROUPS", "value": "false"}],
                }
            }
        )
        d = by_kind(docs, "Deployment")["chat-fanout-worker"]
        self.assertEqual(d["spec"]["replicas"], 5)
        self.assertEqual(env_of(container(d))["CHAT_FANOUT_GROUPS"]["value"], "false")
        self.assertNotIn("chat-fanout-worker", by_kind(docs, "HorizontalPodAutoscaler"))


class Dashboard(unittest.TestCase):
    def test_loaded_by_the_grafana_sidecar_and_uses_real_metrics(self):
        docs = render()
        cm = by_kind(docs, "ConfigMap")["chat-dashboard"]
        self.assertEqual(cm["metadata"]["labels"]["grafana_dashboard"], "1")
        dash = json.loads(cm["data"]["chat-overview.json"])
        titles = [p["title"] for p in dash["panels"] if p["type"] != "row"]
        for want in ("Connections", "Messages per second", "Delivery latency", "Consumer lag per partition", "Refusals by code", "Disconnects by reason"):
            self.assertTrue(any(want in t for t in titles), want)
        code = rust_sources()
        names = set()
        for p in dash["panels"]:
            for t in p.get("targets", []):
                names.update(re.findall(r"\b([a-z][a-z0-9_]*)(?=\{)", t["expr"]))
        self.assertGreater(len(names), 20)
        for name in sorted(names):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            self.assertIn(f'"{base}"', code, f"{name}: no such metric in the code")


class NatsValues(unittest.TestCase):
    def test_the_nats_release_gets_every_password_of_auth_conf(self):
        values = yaml.safe_load((CHART / "nats-values.yaml").read_text())
        auth = (ROOT / "nats" / "auth.conf").read_text()
        wanted = set(re.findall(r"\$(CHAT_NATS_\w+_PASSWORD)", auth))
        self.assertEqual(set(values["container"]["env"]), wanted)
        self.assertEqual(values["config"]["merge"]["$include"], "./auth.conf")
        self.assertTrue(values["config"]["cluster"]["enabled"])
        self.assertEqual(values["config"]["cluster"]["replicas"], 3)
        self.assertEqual(values["config"]["jetstream"]["merge"]["sync_interval"], "2m")


if __name__ == "__main__":
    unittest.main()
