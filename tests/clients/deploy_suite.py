"""Checks the shipped deployment files against Kubernetes and the binaries.

Run by tests/deploy.rs with the directory of the built binaries:
- the Helm chart renders (helm, or ../shared/tools/helm-template) for the
  default values and every ci/*.yaml; each render validates strictly against
  Kubernetes 1.30 (kubernetes-validate) and the values against
  values.schema.json; the structure holds (GPU requests, probes,
  anti-affinity, PDBs, network policy, dashboards);
- every flag and EXPERTMESH_* variable in the rendered containers, the
  preStop drain and deploy/docker-compose.yml is one the binary's --help
  lists;
- the Dockerfiles are multi-stage and run as a non-root user.
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "helm", "expertmesh")
BIN = sys.argv[1]
BINARIES = ("router", "expert-node", "coordinator", "expertmesh")
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def help_of(cmd):
    """(flags, env vars) a binary's --help lists."""
    out = subprocess.run([os.path.join(BIN, cmd[0]), *cmd[1:], "--help"], capture_output=True, text=True, check=True).stdout
    # Variables: clap's `[env: …]`, and those the help names in prose (the
    # etcd password is read from the environment only).
    return set(re.findall(r"(--[a-z0-9-]+)", out)), set(re.findall(r"\b(EXPERTMESH_[A-Z0-9_]+)", out))


HELP = {b: help_of([b]) for b in BINARIES}
HELP["expertmesh drain"] = help_of(["expertmesh", "drain"])
HELP["expertmesh gen-model"] = help_of(["expertmesh", "gen-model"])


def check_flags(where, binary, args, env=()):
    flags, envs = HELP[binary]
    for a in args:
        if a.startswith("--"):
            check(a.split("=", 1)[0] in flags, f"{where}: {binary} has no flag {a.split('=', 1)[0]}")
    for e in env:
        if e.startswith("EXPERTMESH_"):
            check(e in envs, f"{where}: {binary} reads no {e}")


def check_shell(where, script):
    """Flags of `expertmesh SUBCOMMAND` calls inside a shell command."""
    for sub in ("drain", "gen-model"):
        m = re.search(rf"expertmesh {sub}\b(.*)", script)
        if m:
            check_flags(where, f"expertmesh {sub}", m.group(1).split())


def renderer():
    if shutil.which("helm"):
        return lambda vals: ["helm", "template", "demo", CHART, *vals]
    tool = os.environ.get("EXPERTMESH_HELM_TEMPLATE") or os.path.join(ROOT, "..", "shared", "tools", "helm-template", "helm-template")
    if not os.path.exists(tool):
        sys.exit(
            "this test renders the Helm chart and needs Helm 3: install it (https://helm.sh/docs/intro/install/, "
            "or your package manager's `helm`) so that `helm` is on PATH; "
            f"a `helm template`-compatible renderer also works via EXPERTMESH_HELM_TEMPLATE (looked for {tool})"
        )
    return lambda vals: [tool, "--name", "demo", *vals, CHART]


def merged_values(extra):
    base = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))

    def merge(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v
        return a

    return merge(copy.deepcopy(base), extra)


def pods(docs):
    """(kind/name, pod spec) of every workload."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"]


def component(docs, kind, comp):
    return [d for d in docs if d["kind"] == kind and d["metadata"]["labels"].get("app.kubernetes.io/component") == comp]


def check_render(name, values_file):
    vals = yaml.safe_load(open(values_file)) if values_file else {}
    v = merged_values(vals)
    try:
        jsonschema.validate(v, json.load(open(os.path.join(CHART, "values.schema.json"))))
    except jsonschema.ValidationError as e:
        failures.append(f"{name}: values do not match values.schema.json: {e.message}")
    cmd = renderer()(["-f", values_file] if values_file else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        failures.append(f"{name}: render failed: {r.stderr}")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(r.stdout)
    kv = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    val = subprocess.run([kv, "-k", "1.30.0", "--strict", "--quiet", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    check(val.returncode == 0, f"{name}: kubernetes-validate: {val.stdout}{val.stderr}")
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = [d["kind"] for d in docs]

    # Flags and environment against the binaries.
    for where, spec in pods(docs):
        for c in spec["containers"]:
            cmd0 = (c.get("command") or [""])[0]
            env = [e["name"] for e in c.get("env", [])]
            if cmd0 in BINARIES:
                check_flags(f"{name} {where}", cmd0, c.get("args", []), env)
            pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            check_shell(f"{name} {where} preStop", " ".join(pre))
            if "drain" in " ".join(pre):
                # The drain reaches etcd exactly as the node does (TLS, user;
                # the password from the container's environment).
                etcd_args = [a for a in c.get("args", []) if a.startswith(("--etcd", "--cluster"))]
                missing = [a for a in etcd_args if a not in " ".join(pre).split()]
                check(not missing, f"{name} {where}: the preStop drain lacks the node's etcd flags {missing}")
                if v["etcd"]["client"]["user"]:
                    check("EXPERTMESH_ETCD_PASSWORD" in env, f"{name} {where}: the etcd password in the environment")

    # Structure.
    gpu = v["expertNode"]["gpu"]["enabled"]
    mtls = v["internalTls"]["enabled"]
    nodes = component(docs, "StatefulSet", "expert-node")
    check(len(nodes) == 1, f"{name}: one expert-node StatefulSet")
    for n in nodes:
        spec = n["spec"]["template"]["spec"]
        c = spec["containers"][0]
        limits = c["resources"].get("limits", {})
        if gpu:
            check(limits.get("nvidia.com/gpu") == v["expertNode"]["gpu"]["count"], f"{name}: GPU limit on expert nodes")
            check(any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), f"{name}: GPU toleration")
            check(c["image"].endswith("-cuda"), f"{name}: CUDA image on GPU nodes")
            check("--device=cuda:0" in c["args"], f"{name}: GPU nodes compute on the GPU")
            check(v["expertNode"]["gpu"]["count"] == 1, f"{name}: one GPU per expert-node process")
        else:
            check("nvidia.com/gpu" not in limits, f"{name}: no GPU without gpu.enabled")
            check(not any(a.startswith("--device=cuda") for a in c["args"]), f"{name}: CPU nodes without --device=cuda")
        check(spec["terminationGracePeriodSeconds"] >= 60, f"{name}: long grace period on expert nodes")
        check("podAntiAffinity" in spec.get("affinity", {}) or v["expertNode"]["affinity"], f"{name}: expert-node anti-affinity")
        check(any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"]), f"{name}: shm on expert nodes")
        check(all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] == "model"), f"{name}: model mounted read-only")
    for where, spec in pods(docs):
        if where.startswith("Pod/"):
            continue
        for c in spec["containers"]:
            for p in ("livenessProbe", "readinessProbe"):
                check(p in c, f"{name} {where}: {p}")
            probe = c["readinessProbe"]
            if c["name"] in ("expert-node", "coordinator"):
                check(("tcpSocket" if mtls else "grpc") in probe, f"{name} {where}: gRPC health probe")
            if c["name"] == "router":
                check(probe.get("httpGet", {}).get("path") == "/ready", f"{name} {where}: router readiness on /ready")
            if c["name"] in ("expert-node", "router"):
                s = c.get("startupProbe", {})
                check(s.get("failureThreshold", 0) * s.get("periodSeconds", 0) >= 600, f"{name} {where}: startup probe sized for model loading")
            if c["name"] != "etcd":
                check(spec.get("securityContext", {}).get("runAsNonRoot") is True, f"{name} {where}: non-root")
    external = bool(v["etcd"]["external"]["endpoints"])
    etcd = component(docs, "StatefulSet", "etcd")
    check(len(etcd) == (0 if external else 1), f"{name}: etcd StatefulSet unless external")
    for e in etcd:
        check(e["spec"]["replicas"] == 3, f"{name}: 3 etcd members")
        aa = e["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        check("requiredDuringSchedulingIgnoredDuringExecution" in aa, f"{name}: etcd members on distinct hosts")
    for comp in ["router", "expert-node", "coordinator"] + ([] if external else ["etcd"]):
        check(len(component(docs, "PodDisruptionBudget", comp)) == 1, f"{name}: PDB for {comp}")
    coord = component(docs, "Deployment", "coordinator")
    check(coord and coord[0]["spec"]["replicas"] == 2, f"{name}: 2 coordinators")
    redundant = v["coordinator"]["redundantExperts"]
    if coord and str(redundant) != "":
        args = coord[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        check(f"--redundant-experts={redundant}" in args, f"{name}: redundantExperts {redundant!r} reaches the coordinator")
    routers = component(docs, "Deployment", "router")
    nccl = v["router"]["transport"] == "nccl"
    for r in routers:
        spec = r["spec"]["template"]["spec"]
        c = spec["containers"][0]
        limits = c["resources"].get("limits", {})
        check(f"--transport={v['router']['transport']}" in c["args"], f"{name}: router.transport reaches the router")
        if nccl:
            check(limits.get("nvidia.com/gpu") == 1 and c["image"].endswith("-cuda"), f"{name}: an NCCL router has a GPU and the CUDA image")
            check("--nccl-device=cuda:0" in c["args"], f"{name}: an NCCL router stages through its GPU")
            check(any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), f"{name}: GPU toleration on NCCL routers")
            check(gpu and not mtls, f"{name}: NCCL only with GPU nodes and without internal TLS")
            if v["networkPolicy"]["enabled"]:
                np = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-expert-node")]
                open_rule = any("ports" not in r for p in np for r in p["spec"]["ingress"])
                check(open_rule, f"{name}: routers reach expert nodes on NCCL's ephemeral ports")
        else:
            check("nvidia.com/gpu" not in limits, f"{name}: no GPU on a router without NCCL")
    if routers and "DeepSeek-V3" in v["model"]["path"]:
        mem = routers[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        check(mem.endswith("Gi") and int(mem[:-2]) >= 40, f"{name}: a DeepSeek-V3 router needs ~40 GiB (limit {mem})")
    check(("HorizontalPodAutoscaler" in kinds) == v["router"]["autoscaling"]["enabled"], f"{name}: router HPA")
    check(("NetworkPolicy" in kinds) == v["networkPolicy"]["enabled"], f"{name}: NetworkPolicy")
    check(("ServiceMonitor" in kinds) == v["metrics"]["serviceMonitor"]["enabled"], f"{name}: ServiceMonitor")
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    check(len(dashboards) == 3, f"{name}: 3 dashboard ConfigMaps")
    for d in dashboards:
        for key, text in d["data"].items():
            shipped = json.load(open(os.path.join(ROOT, "deploy", "grafana", key.removeprefix("expertmesh-"))))
            check(json.loads(text) == shipped, f"{name}: {key} differs from deploy/grafana")
    tests = [d for d in docs if d["kind"] == "Pod" and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    check(len(tests) == 1, f"{name}: a helm test pod")
    if mtls:
        for where, spec in pods(docs):
            for c in spec["containers"]:
                if (c.get("command") or [""])[0] in ("router", "expert-node", "coordinator"):
                    check(any(a.startswith("--internal-ca=") for a in c["args"]), f"{name} {where}: internal mTLS flags")
    print(f"{name}: {len(docs)} objects rendered and checked")


def check_compose():
    c = yaml.safe_load(open(os.path.join(ROOT, "deploy", "docker-compose.yml")))
    services = c["services"]
    for want in ("etcd", "coordinator", "expert-node-0", "expert-node-1", "router", "prometheus", "grafana"):
        check(want in services, f"compose: service {want}")
    for name, s in services.items():
        cmd = s.get("command") or []
        env = list((s.get("environment") or {}).keys())
        if cmd and cmd[0] in BINARIES:
            check_flags(f"compose {name}", cmd[0], cmd[1:], env)
        elif cmd[:2] == ["sh", "-c"]:
            check_shell(f"compose {name}", cmd[2])
    for vol in services["grafana"]["volumes"]:
        check(os.path.exists(os.path.join(ROOT, "deploy", vol.split(":")[0])), f"compose: grafana mounts {vol}")
    for vol in services["prometheus"]["volumes"]:
        check(os.path.exists(os.path.join(ROOT, "deploy", vol.split(":")[0])), f"compose: prometheus mounts {vol}")
    print(f"compose: {len(services)} services checked")


def check_dockerfiles():
    for f in ("Dockerfile", "Dockerfile.cuda"):
        text = open(os.path.join(ROOT, "deploy", "docker", f)).read()
        stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
        check(len(stages) >= 2, f"{f}: multi-stage")
        final = text[text.rfind("\nFROM"):]
        user = re.findall(r"^USER\s+(\S+)", final, re.M)
        check(user and not user[-1].startswith(("0", "root")), f"{f}: final stage runs as non-root")
        for b in ("router", "expert-node", "coordinator", "expertmesh"):
            check(f"target/release/{b}" in text, f"{f}: ships {b}")
        if f.endswith("cuda"):
            check("nvidia/cuda" in stages[-1] and "runtime" in stages[-1], f"{f}: CUDA runtime base")
            for lib in ("libcublas", "libnccl", "nvrtc"):
                check(lib in final, f"{f}: the runtime stage has {lib}")
            check("libnccl.so.2 " in final and "libnccl.so" in final, f"{f}: the libnccl.so link cudarc looks for")
            check("target/release/expertmesh-gpu-check" in text, f"{f}: ships the GPU check")


def check_refused(name, values, words):
    """A values file the chart must refuse, saying why."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values, f)
    r = subprocess.run(renderer()(["-f", f.name]), capture_output=True, text=True)
    os.unlink(f.name)
    check(r.returncode != 0 and words in r.stderr, f"{name}: refused ({words!r}): rc {r.returncode} {r.stderr[-300:]}")


check_refused("nccl without GPU nodes", {"router": {"transport": "nccl"}}, "needs GPU expert nodes")
mtls = {"enabled": True, "certManager": {"enabled": True}}
check_refused("tcp under internal TLS", {"router": {"transport": "tcp"}, "internalTls": mtls}, "plaintext")
check_render("default", None)
for f in sorted(os.listdir(os.path.join(CHART, "ci"))):
    check_render(f"ci/{f}", os.path.join(CHART, "ci", f))
check_compose()
check_dockerfiles()
if failures:
    print("\n".join(["FAILED:"] + failures))
    sys.exit(1)
print("deploy suite: all checks passed")
