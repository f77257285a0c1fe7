#!/usr/bin/env bash
# Proves the packages install: packs `kvtransfer` and this platform's `kvtransfer-<platform>` the way they are
# published (the main package names every per-platform package as an optional dependency, as
# `napi pre-publish` does), installs the two tarballs into an empty directory outside the repository, then
# type-checks and runs the examples there against the installed declarations (strict), runs
# `npx kvtransfer info`, and packages the Rust crate (`cargo package`, no publish).
# Needs the addon built (`npm run build`).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
version=$(node -p 'require("./package.json").version')
target=$(node -p 'require("./index.js").platform()')
[ -f "kvtransfer.$target.node" ] || { echo "no kvtransfer.$target.node: run npm run build first" >&2; exit 1; }
[ -d "npm/$target" ] || { echo "kvtransfer does not ship $target (npm/ has $(ls npm | tr '\n' ' '))" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== packing into $work"
# The per-platform package: the binary built for this machine.
cp -r "npm/$target" "$work/platform"
cp "kvtransfer.$target.node" "$work/platform/"
(cd "$work/platform" && npm pack --silent --pack-destination "$work" >/dev/null)
# The main package as published: its files, optional dependencies on every platform package, no dev scripts.
mkdir "$work/main"
node -e '
  const fs = require("fs"), path = require("path")
  const [repo, out] = process.argv.slice(1)
  const pkg = JSON.parse(fs.readFileSync(path.join(repo, "package.json"), "utf8"))
  // Entries are files, or `dir/*.ext` patterns (the compiled modules).
  const expand = (f) => {
    const m = /^(.*)\/\*(\.[\w.]+)$/.exec(f)
    if (!m) return [f]
    return fs.readdirSync(path.join(repo, m[1])).filter((n) => n.endsWith(m[2])).map((n) => `${m[1]}/${n}`)
  }
  for (const f of [...pkg.files, "README.md", "package.json"].flatMap(expand)) {
    fs.mkdirSync(path.dirname(path.join(out, f)), { recursive: true })
    fs.copyFileSync(path.join(repo, f), path.join(out, f))
  }
  pkg.optionalDependencies = {}
  for (const dir of fs.readdirSync(path.join(repo, "npm"))) {
    const p = JSON.parse(fs.readFileSync(path.join(repo, "npm", dir, "package.json"), "utf8"))
    if (p.version !== pkg.version) throw new Error(`${p.name} is at ${p.version}, kvtransfer at ${pkg.version}`)
    pkg.optionalDependencies[p.name] = p.version
  }
  delete pkg.devDependencies
  delete pkg.scripts
  fs.writeFileSync(path.join(out, "package.json"), JSON.stringify(pkg, null, 2) + "\n")
' "$repo" "$work/main"
(cd "$work/main" && npm pack --silent --pack-destination "$work" >/dev/null)
ls -la "$work"/*.tgz
tar -tzf "$work/kvtransfer-$version.tgz" | sort
tar -tzf "$work/kvtransfer-$target-$version.tgz" | sort

echo "== installing into an empty directory"
app="$work/app"
mkdir "$app" && cd "$app"
npm init -y >/dev/null
# Other platforms' packages are optional: npm skips them (unpublished ones with a warning).
npm install --no-audit --no-fund --loglevel=error "$work/kvtransfer-$version.tgz" "$work/kvtransfer-$target-$version.tgz"
# The compiler and Node's types, at the versions the repository builds with.
npm install --no-audit --no-fund --loglevel=error \
  "typescript@$(node -p "require('$repo/node_modules/typescript/package.json').version")" \
  "@types/node@$(node -p "require('$repo/node_modules/@types/node/package.json').version")"
[ ! -e node_modules/kvtransfer/kvtransfer.$target.node ] || { echo "the main package must not carry a binary" >&2; exit 1; }
ls node_modules | grep kvtransfer

echo "== type-checking the examples against the installed package (strict)"
mkdir examples
# prom-client for kvtransfer/prometheus (an optional peer dependency), at the version the repository tests.
npm install --no-audit --no-fund --loglevel=error "prom-client@$(node -p "require('$repo/node_modules/prom-client/package.json').version")"
cp "$repo"/examples/{engine.ts,api-tour.ts,metrics-server.ts,quickstart.mjs,tsconfig.json} examples/
npx tsc -p examples --noEmit
npx tsc -p examples

echo "== running them"
node examples/quickstart.mjs   # the README's example, as written
node examples/dist/api-tour.js
node examples/dist/engine.js
METRICS_SECONDS=1 node examples/dist/metrics-server.js
npx kvtransfer info
# The bench from the installed package: a decode process, a write checked byte for byte, the peers (Mooncake,
# NIXL) installed from the Python package registry into an environment of their own and run on the same
# workload, and the plot (Vega-Lite, an optional peer dependency, at the version the repository tests).
npm install --no-audit --no-fund --loglevel=error \
  "vega@$(node -p "require('$repo/node_modules/vega/package.json').version")" \
  "vega-lite@$(node -p "require('$repo/node_modules/vega-lite/package.json').version")"
npx kvtransfer bench --transports tcp --sizes 1,64 --batch 256 --iterations 3
npx kvtransfer bench --transports tcp,shm --sizes 1,64 --batch 256 --iterations 3 --peers mooncake,nixl \
  --peers-venv "$PWD/peers-venv" --plot bench.svg --json >bench.json
node -e '
  const r = require("./bench.json")
  for (const peer of ["mooncake", "nixl"]) {
    const rows = r.rows.filter((x) => x.system === peer)
    if (rows.length === 0 || !rows.every((x) => x.verified)) {
      console.error(`${peer} did not run on the same workload: ${JSON.stringify(r.skipped)} ${JSON.stringify(r.failed)}`)
      process.exit(1)
    }
  }
  console.log(`peers ran: ${r.rows.filter((x) => x.system !== "kvtransfer").map((x) => `${x.system} ${x.transport} ${x.blockBytes / 1024} KiB`).join(", ")}`)
  for (const g of r.goals) console.log(`${g.met ? "met" : "missed"}: ${g.goal} ≥ ${g.target}: ${g.worst.toFixed(2)}`)
'
grep -q '<svg' bench.svg
# The soak, bounded: mixed traffic checked byte for byte, on each host transport (exit 1 on any failure).
npx kvtransfer soak --duration 90s --interval 30s --peers 4 --transport tcp
npx kvtransfer soak --duration 90s --interval 30s --peers 4 --transport shm
# And with chaos: the prefill process killed or stopped about once a second, at random moments of its requests.
# (Sampled every 15 s: the decode is hit until three intervals before the end, the last one then sampled twice.)
npx kvtransfer soak --duration 90s --interval 15s --peers 4 --transport tcp --chaos 1s
npx kvtransfer soak --duration 90s --interval 15s --peers 4 --transport shm --chaos 1s
# Load: 16 prefill processes into one decode, and one prefill process into 8 decodes, each request of 8 layers;
# every byte checked, the footprint (memory, threads, descriptors, data connections) flat after the first
# interval, and nothing the decodes hold once every prefill has gone. The footprint over time is drawn.
npx kvtransfer soak --duration 60s --interval 15s --prefills 16 --peers 1 --layers 8 --transport tcp --plot soak-fan-in.svg
npx kvtransfer soak --duration 60s --interval 15s --decodes 8 --peers 2 --layers 8 --transport tcp --plot soak-fan-out.svg
grep -q '<svg' soak-fan-in.svg && grep -q '<svg' soak-fan-out.svg
KVCACHE_IB_TIMEOUT=99 npx kvtransfer info --json >info.json && { echo "a bad KVCACHE_IB_TIMEOUT must fail info" >&2; exit 1; }
node -e 'const i = require("./info.json"); const s = i.settings.find((s) => s.env === "KVCACHE_IB_TIMEOUT"); if (!/KVCACHE_IB_TIMEOUT/.test(s.error)) process.exit(1)'

echo "== cargo package (the core crate: packaged and built from the package, not published)"
cd "$repo"
cargo package -p kvtransfer --locked --allow-dirty 2>&1 | tail -2   # builds the packaged crate, as a user would
tar -tzf "target/package/kvtransfer-$version.crate" | grep -E 'Cargo.toml$|src/lib.rs|copy_blocks.ptx|README.md'
echo "packages install and work"
