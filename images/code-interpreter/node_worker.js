// The TypeScript/JavaScript worker of Cove's code interpreter (see server.py).
//
// `node node_worker.js`: a context. Reads one JSON request a line on stdin and answers one a
// line on stdout: `{"cwd"}` changes directory; `{"code", "env_vars", "timeout_ms"}` runs code
// in the context's one `vm` context, so declarations persist from one execution to the next.
// `node node_worker.js --run CODE`: runs CODE once with the real console (`/execute/async`).
//
// TypeScript is transpiled with the `typescript` package of the template (types are not
// checked, as in a REPL); plain JavaScript passes through it unchanged.
"use strict";

const fs = require("fs");
const path = require("path");
const readline = require("readline");
const util = require("util");
const vm = require("vm");

function loadTypescript() {
    for (const dir of ["/usr/local/lib/node_modules/typescript", "typescript"]) {
        try {
            return require(dir);
        } catch (_) {}
    }
    return null;
}
const ts = loadTypescript();

function transpile(code) {
    if (!ts) return code;
    return ts.transpileModule(code, {
        compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.None, removeComments: false },
        reportDiagnostics: false,
    }).outputText.replace(/^"use strict";\s*/, "").replace(/^Object\.defineProperty\(exports.*\n/m, "");
}

if (process.argv[2] === "--run") {
    const context = vm.createContext({ console, process, require, Buffer, setTimeout, setInterval, clearTimeout, clearInterval });
    try {
        vm.runInContext(transpile(process.argv[3] || ""), context, { filename: "<cell>" });
    } catch (e) {
        console.error(e && e.stack ? e.stack : String(e));
        process.exitCode = 1;
    }
    return;
}

// Answers go to the original stdout; anything else written there goes to stderr instead.
const answer = (obj) => fs.writeSync(1, JSON.stringify(obj) + "\n");
process.stdout.write = (chunk, ...rest) => process.stderr.write(chunk, ...rest);

let logs = { stdout: [], stderr: [] };
const line = (args) => util.formatWithOptions({ colors: false }, ...args) + "\n";
const cellConsole = {
    log: (...a) => logs.stdout.push(line(a)),
    info: (...a) => logs.stdout.push(line(a)),
    debug: (...a) => logs.stdout.push(line(a)),
    warn: (...a) => logs.stderr.push(line(a)),
    error: (...a) => logs.stderr.push(line(a)),
};
const sandbox = {
    console: cellConsole, process, require, Buffer, URL, TextEncoder, TextDecoder,
    setTimeout, setInterval, clearTimeout, clearInterval, module: { exports: {} }, exports: {},
};
const context = vm.createContext(sandbox);
let count = 0;

async function run(req) {
    count += 1;
    logs = { stdout: [], stderr: [] };
    const saved = {};
    for (const [k, v] of Object.entries(req.env_vars || {})) {
        saved[k] = process.env[k];
        process.env[k] = v;
    }
    const result = { items: [], logs, execution_count: count };
    try {
        let value = vm.runInContext(transpile(req.code), context, {
            filename: "<cell>",
            timeout: req.timeout_ms || 30000,
        });
        if (value && typeof value.then === "function") value = await value;
        if (value !== undefined) {
            result.items.push({ is_primary: true, text: typeof value === "string" ? value : util.inspect(value) });
        }
    } catch (e) {
        const timedOut = e && e.code === "ERR_SCRIPT_EXECUTION_TIMEOUT";
        result.error = {
            name: timedOut ? "TimeoutError" : (e && e.name) || "Error",
            value: timedOut ? "execution timed out" : (e && e.message) || String(e),
            traceback: (e && e.stack) || String(e),
        };
    } finally {
        for (const [k, v] of Object.entries(saved)) {
            if (v === undefined) delete process.env[k];
            else process.env[k] = v;
        }
    }
    return result;
}

answer({ ready: true });
const rl = readline.createInterface({ input: process.stdin, terminal: false });
let queue = Promise.resolve();
rl.on("line", (raw) => {
    queue = queue.then(async () => {
        const req = JSON.parse(raw);
        if (req.cwd !== undefined && req.code === undefined) {
            process.chdir(path.resolve(req.cwd));
            return answer({ ok: true });
        }
        answer(await run(req));
    });
});
