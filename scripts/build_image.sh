#!/usr/bin/env bash
# Build the segcore image with buildah and smoke-test it with podman, on a machine without a
# Docker engine (../shared/DESIGN.md, "Images without a Docker engine"). Run as root; CI runs it.
#
#   scripts/build_image.sh            build, smoke-test, print size and timings
#   scripts/build_image.sh --no-smoke build only
#   scripts/build_image.sh --clean    delete the work folder (images, layer cache, wheel)
#
# Environment:
#   IMAGE                  tag to build (default localhost/segcore:dev)
#   SEGCORE_BUILD_CACHE    work folder for container storage, the base image and the torch wheel,
#                          kept between runs so rebuilds are cheap (default: ../build-cache next to
#                          the repository). Nothing is written to /var/lib/containers or /etc.
#   DEBIAN_MIRROR          Debian mirror for debootstrap (default: the machine's apt sources)
#   TORCH_WHEEL_DIR        where to look for the torch CPU wheel (default /opt/wheels, then pip)
#   TORCH_INDEX_URL        use this index for torch instead of a wheel (must be reachable)
#   TORCH_VARIANT          cpu (default) or a CUDA flavour such as cu128: the image for GPU nodes,
#                          torch from TORCH_INDEX_URL (default download.pytorch.org/whl/VARIANT)
#   SMOKE_COMPONENT        module:attribute (or file.py:attribute) of the Kubeflow component to
#                          run through kfp's executor (default components.convert:convert_op)
#   SMOKE_COMPONENT_INPUTS JSON {input name: value}; input artifacts are given as paths inside the
#                          container (/work/raw: raw demo data, /work/dataset: converted dataset,
#                          /work/model: trained bundle). Default: the convert component on the
#                          demo data, tracking off: {"train_data_uri": "/work/raw", "tracking": false}
#
# Why scripts/ and not tests/: it needs root, apt, network and minutes; pytest collects tests/.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${IMAGE:-localhost/segcore:dev}
CACHE=${SEGCORE_BUILD_CACHE:-$(dirname "$REPO")/build-cache}
BASE_IMAGE=localhost/bookworm-py:latest
SMOKE=1
case ${1:-} in
    "") ;;
    --no-smoke) SMOKE=0 ;;
    --clean) CLEAN=1 ;;
    *) echo "usage: $0 [--no-smoke | --clean]" >&2; exit 2 ;;
esac

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'build_image.sh: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (buildah/podman/debootstrap need it here)"

unmount_under() {  # what an interrupted debootstrap or container left mounted below $1
    awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
}
if [[ ${CLEAN:-0} == 1 ]]; then
    unmount_under "$CACHE"
    rm -rf --one-file-system "$CACHE"
    echo "removed $CACHE"
    exit 0
fi

# ------------------------------------------------------------------------------------ tools
missing=()
for tool in buildah podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends buildah podman runc debootstrap
fi

# ------------------------------------------------------------------- storage in the work folder
mkdir -p "$CACHE/storage" "$CACHE/wheels"
cat >"$CACHE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage/graph"
runroot = "$CACHE/storage/run"
EOF
# runc: crun fails on these hosts' cgroups; no systemd/journald to talk to; host network only.
cat >"$CACHE/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_STORAGE_CONF=$CACHE/storage.conf CONTAINERS_CONF=$CACHE/containers.conf
WORK=$(mktemp -d "$CACHE/run.XXXXXX")
export TMPDIR=$WORK/tmp
mkdir -p "$TMPDIR"

cleanup() {
    local rc=$?
    # working containers of an interrupted build, then this run's scratch files
    buildah rm --all >/dev/null 2>&1 || true
    podman image unmount --all >/dev/null 2>&1 || true
    unmount_under "$WORK"
    rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run() {  # podman run as DESIGN.md says (runc, host network unless NET=none, ulimits)
    podman run --rm --network "${NET:-host}" --runtime runc \
        --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 "$@"
}

# ----------------------------------------------------------------- base image (cached in storage)
detect_mirror() {
    local m
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v '^[[:space:]]*#' | grep -oE '(https?|file)://[^[:space:]]*debian[^[:space:]]*' |
        grep -v -- '-security' | head -n 1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}
t_base=0
if ! podman image exists "$BASE_IMAGE"; then
    mirror=${DEBIAN_MIRROR:-$(detect_mirror)}
    log "base image: debootstrap bookworm from $mirror"
    t0=$SECONDS
    rootfs=$WORK/rootfs
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import -q --message "debootstrap bookworm minbase + python3" - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    t_base=$((SECONDS - t0))
fi
run "$BASE_IMAGE" python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' ||
    die "base image: python3 is not 3.11"

# -------------------------------------------------------------------------- torch CPU wheel
torch_version=$(python3 -c "
import re, tomllib
deps = tomllib.load(open('$REPO/pyproject.toml', 'rb'))['project']['dependencies']
print(next(re.sub(r'^torch\s*==\s*', '', d).strip() for d in deps if re.match(r'torch\s*==', d)))")
torch_index=${TORCH_INDEX_URL:-}
torch_variant=${TORCH_VARIANT:-cpu}
wheels=$CACHE/wheels
if [[ $torch_variant != cpu ]]; then  # a CUDA build comes from its index; no CPU wheel beside it
    torch_index=${torch_index:-https://download.pytorch.org/whl/$torch_variant}
    wheels=$CACHE/wheels-$torch_variant
    mkdir -p "$wheels"
elif [[ -z $torch_index ]] && ! compgen -G "$CACHE/wheels/torch-${torch_version}+cpu-cp311-*.whl" >/dev/null; then
    rm -f "$CACHE"/wheels/torch-*.whl
    found=$(compgen -G "${TORCH_WHEEL_DIR:-/opt/wheels}/torch-${torch_version}+cpu-cp311-*linux*x86_64.whl" | head -n 1 || true)
    if [[ -n $found ]]; then
        cp "$found" "$CACHE/wheels/"
    else
        log "downloading torch==$torch_version (pip download --no-deps)"
        python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 -d "$CACHE/wheels" "torch==$torch_version" || true
    fi
    compgen -G "$CACHE/wheels/torch-${torch_version}+cpu-*.whl" >/dev/null ||
        die "no CPU wheel of torch $torch_version (got: $(ls "$CACHE/wheels")); set TORCH_WHEEL_DIR or TORCH_INDEX_URL"
fi

# ------------------------------------------------------------------------------------- build
version=$(python3 -c "import tomllib; print(tomllib.load(open('$REPO/pyproject.toml', 'rb'))['project']['version'])")
revision=$(git -C "$REPO" describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_VERSION=$torch_version"
    --build-arg "TORCH_VARIANT=$torch_variant" --build-arg "TORCH_INDEX_URL=$torch_index"
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-context "wheels=$wheels")
# HTTPS from the build goes through a proxy whose CA only the host's bundle has
[[ -f /etc/ssl/certs/ca-certificates.crt ]] &&
    build_args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
log "building $IMAGE (revision $revision)"
t0=$SECONDS
buildah bud --isolation chroot --network host --layers "${build_args[@]}" \
    -f "$REPO/Dockerfile" -t "$IMAGE" "$REPO"
t_build=$((SECONDS - t0))
podman image prune -f >/dev/null  # superseded layers of earlier builds; the cache stays

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((size / 1000000)) MB uncompressed; layers (newest first):"
podman history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | grep -v '^0 B' |
    sed -E 's/\|[0-9]+ ([A-Za-z_]+=[^ ]* )*//; s#/bin/sh -c (\#\(nop\) )?##' | cut -c1-120 || true
log "biggest packages in the image's virtualenv (MB)"
run --entrypoint /bin/sh "$IMAGE" -c \
    'du -sm /opt/venv/lib/python3.11/site-packages/* | sort -rn | head -n 15; du -sm /opt/venv /usr | sort -rn'

if ((SMOKE == 0)); then
    printf '\nbuild %ss (base image %ss)\n' "$t_build" "$t_base"
    exit 0
fi

# ------------------------------------------------------------------------------------- smoke
t0=$SECONDS
smoke=$WORK/smoke
mkdir -p "$smoke"
chown 10001:10001 "$smoke"  # the image's user writes here

log "smoke: runs as non-root"
uid=$(run "$IMAGE" id -u)
[[ $uid != 0 ]] || die "the container runs as root"
echo "uid $uid"

log "smoke: segcore --help"
run "$IMAGE" segcore --help >/dev/null

log "smoke: demo-data, convert, 1-epoch train"
run -v "$smoke:/work" "$IMAGE" sh -euxc '
    segcore demo-data --output /work/raw --num-train 6 --num-val 2 --size 48x64
    segcore convert --train-data-root /work/raw --output /work/dataset
    segcore train Lite-HRNet-s-mod2 --train-data-root /work/dataset --output /work/model \
        --epochs 1 --input-size 64x64 --batch-size 2 --num-workers 0'
[[ -f $smoke/dataset/manifest.json && -f $smoke/model/model.json && -f $smoke/model/best.pt ]] ||
    die "convert/train left no manifest.json / model.json / best.pt"

log "smoke: data-parallel training, 2 processes under torchrun (gloo)"
run -v "$smoke:/work" "$IMAGE" segcore train Lite-HRNet-s-mod2 --train-data-root /work/dataset \
    --output /work/model-ddp --epochs 1 --input-size 64x64 --batch-size 1 --num-workers 0 --nproc-per-node 2
grep -q '"train_processes": 2' "$smoke/model-ddp/model.json" || die "the 2-process training left no bundle"

log "smoke: a component through kfp's executor, with the command line the compiled YAML gives"
# A stand-in component used until components/ has one: it calls segcore and writes an artifact.
cat >"$smoke/probe_component.py" <<'EOF'
from kfp import dsl
from kfp.dsl import Dataset, Output


@dsl.component(base_image="segcore")
def probe(num_train: int, demo: Output[Dataset]) -> str:
    import segcore
    from segcore.cli import main

    assert main(["demo-data", "--output", demo.path, "--num-train", str(num_train), "--num-val", "1"]) == 0
    return segcore.__version__
EOF
# Compile the component with the image's kfp, take the container command + args of its executor
# from the pipeline spec, put an executor input (what the Kubeflow launcher passes as {{$}}) in,
# run it, then check the executor output and every output artifact.
cat >"$smoke/kfp_smoke.py" <<'EOF'
import importlib, importlib.util, inspect, json, os, pkgutil, subprocess, sys
import yaml
from kfp import compiler
from kfp.dsl.python_component import PythonComponent

inputs = json.loads(os.environ.get("SMOKE_COMPONENT_INPUTS") or "{}")
choice = os.environ.get("SMOKE_COMPONENT", "")


def load(ref):
    mod_name, _, attr = ref.partition(":")
    if mod_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("smoke_module", mod_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    return getattr(module, attr)


def required(comp):
    defs = comp.component_spec.inputs or {}
    return {name for name, spec in defs.items() if not spec.optional}


if choice:
    comp = load(choice)
else:
    import components
    found = []
    for info in pkgutil.iter_modules(components.__path__, "components."):
        module = importlib.import_module(info.name)
        found += [(f"{info.name}:{n}", c) for n, c in inspect.getmembers(module) if isinstance(c, PythonComponent)]
    usable = [(ref, c) for ref, c in found if required(c) <= set(inputs)]
    if usable:
        choice, comp = usable[0]
    elif found:
        sys.exit("components found but SMOKE_COMPONENT_INPUTS lacks their inputs: "
                 + "; ".join(f"{ref} needs {sorted(required(c))}" for ref, c in found))
    else:
        print("no component in components/ yet: running the probe component")
        choice, comp = "/work/probe_component.py:probe", load("/work/probe_component.py:probe")
        inputs = {"num_train": 2}
print("component:", choice)

os.makedirs("/work/kfp", exist_ok=True)
compiler.Compiler().compile(comp, "/work/kfp/component.yaml")
spec = yaml.safe_load(open("/work/kfp/component.yaml"))
(executor,) = spec["deploymentSpec"]["executors"].values()
container = executor["container"]
root = spec["root"]
in_defs, out_defs = root.get("inputDefinitions", {}), root.get("outputDefinitions", {})

out_dir = "/work/kfp/outputs"
executor_input = {
    "inputs": {
        "parameterValues": {k: inputs[k] for k in in_defs.get("parameters", {}) if k in inputs},
        "artifacts": {
            k: {"artifacts": [{"name": k, "type": v["artifactType"], "uri": inputs[k], "metadata": {}}]}
            for k, v in in_defs.get("artifacts", {}).items() if k in inputs
        },
    },
    "outputs": {
        "parameters": {k: {"outputFile": f"{out_dir}/parameters/{k}"} for k in out_defs.get("parameters", {})},
        "artifacts": {
            k: {"artifacts": [{"name": k, "type": v["artifactType"], "uri": f"{out_dir}/artifacts/{k}", "metadata": {}}]}
            for k, v in out_defs.get("artifacts", {}).items()
        },
        "outputFile": f"{out_dir}/executor_output.json",
    },
}
argv = container["command"] + [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
print("command:", json.dumps(container["command"][:3] + ["..."] if len(container["command"]) > 6 else container["command"]))
print("args:", json.dumps(container["args"]))
subprocess.run(argv, check=True)

result = json.load(open(f"{out_dir}/executor_output.json"))
print("executor output:", json.dumps(result)[:500])
for name in out_defs.get("artifacts", {}):
    path = f"{out_dir}/artifacts/{name}"
    assert os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)), f"output artifact {name} missing"
for name in out_defs.get("parameters", {}):
    assert name in result.get("parameterValues", {}) or os.path.exists(f"{out_dir}/parameters/{name}"), name
print("component OK")
EOF
chown -R 10001:10001 "$smoke"
# --network none: a step must not need the network to start (clusters often have no egress; the
# compiled command's `pip install kfp==...` must find kfp already installed).
smoke_inputs='{"train_data_uri": "/work/raw", "tracking": false}'  # the convert component, demo data
NET=none run -v "$smoke:/work" -e SMOKE_COMPONENT="${SMOKE_COMPONENT:-components.convert:convert_op}" \
    -e SMOKE_COMPONENT_INPUTS="${SMOKE_COMPONENT_INPUTS:-$smoke_inputs}" "$IMAGE" python3 /work/kfp_smoke.py
t_smoke=$((SECONDS - t0))

printf '\nimage %s: %s MB; build %ss (base image %ss), smoke tests %ss\n' \
    "$IMAGE" "$((size / 1000000))" "$t_build" "$t_base" "$t_smoke"
