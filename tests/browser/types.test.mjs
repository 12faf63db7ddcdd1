// The browser library's TypeScript declarations, checked by the compiler:
// types/usage.ts uses every recipient type the hub accepts and must compile
// under --strict, and what the hub refuses must not (@ts-expect-error lines
// fail the build when they compile). Needs no browser; it lives here because
// this folder's package.json brings the compiler.

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { createRequire } from "node:module";
import { ROOT } from "./harness.mjs";

test("the .d.ts type-checks a use of every recipient type the hub accepts", async () => {
  const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
  const fixture = join(ROOT, "tests", "browser", "types", "usage.ts");
  const { code, output } = await new Promise((resolve) => {
    execFile(process.execPath, [tsc, "--noEmit", "--strict", "--target", "es2022", "--module", "es2022",
      "--moduleResolution", "bundler", "--lib", "es2022,dom", fixture], (err, stdout, stderr) => {
      resolve({ code: err ? err.code : 0, output: stdout + stderr });
    });
  });
  assert.equal(code, 0, output);
});
