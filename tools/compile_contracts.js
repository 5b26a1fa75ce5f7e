// Compiles contracts/*.sol with solc-js into contracts/build/<Name>.json (abi, bytecode).
// The EVM version is pinned: solc's default target (osaka) is newer than py-evm, which the
// fast unit tests run on, supports. Skips the work when no source changed.
"use strict";
const fs = require("fs");
const path = require("path");
const crypto = require("crypto");
const solc = require(path.join(__dirname, "npm", "node_modules", "solc"));

const EVM_VERSION = "prague";
const root = path.join(__dirname, "..", "contracts");
const out = path.join(root, "build");
const sources = fs.existsSync(root)
  ? fs.readdirSync(root).filter((f) => f.endsWith(".sol")).sort()
  : [];
if (sources.length === 0) {
  console.log("contracts: none yet");
  process.exit(0);
}
const input = { language: "Solidity", sources: {}, settings: {
  evmVersion: EVM_VERSION,
  optimizer: { enabled: true, runs: 200 },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
} };
const hash = crypto.createHash("sha256").update(solc.version() + EVM_VERSION);
for (const f of sources) {
  const content = fs.readFileSync(path.join(root, f), "utf8");
  input.sources[f] = { content };
  hash.update(f + "\0" + content);
}
const digest = hash.digest("hex");
const stamp = path.join(out, ".sources.sha256");
if (fs.existsSync(stamp) && fs.readFileSync(stamp, "utf8") === digest) {
  console.log(`contracts: ${sources.length} unchanged`);
  process.exit(0);
}
const result = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (result.errors || []).filter((e) => e.severity === "error");
for (const e of result.errors || []) console.error(e.formattedMessage);
if (errors.length) process.exit(1);
fs.mkdirSync(out, { recursive: true });
for (const [file, contracts] of Object.entries(result.contracts)) {
  for (const [name, c] of Object.entries(contracts)) {
    fs.writeFileSync(path.join(out, `${name}.json`), JSON.stringify({
      contractName: name, sourceName: file, evmVersion: EVM_VERSION, compiler: solc.version(),
      abi: c.abi, bytecode: "0x" + c.evm.bytecode.object, deployedBytecode: "0x" + c.evm.deployedBytecode.object,
    }, null, 2));
  }
}
fs.writeFileSync(stamp, digest);
console.log(`contracts: compiled ${sources.length} with solc ${solc.version()} for ${EVM_VERSION}`);
