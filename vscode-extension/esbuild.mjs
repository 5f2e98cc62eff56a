// Builds the extension bundle (dist/) or, with --tests, the test bundles (out/test/).
import * as esbuild from 'esbuild';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';

const production = process.argv.includes('--production');
const tests = process.argv.includes('--tests');

function testEntries(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return entry.name === 'mock' || entry.name === 'fixtures' ? [] : testEntries(path);
    return entry.name.endsWith('.test.ts') ? [path] : [];
  });
}

const common = {
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  logLevel: 'warning',
};

if (tests) {
  // The `vscode` module exists only inside the editor; tests (and the language client
  // they load) get the mock instead.
  await esbuild.build({
    ...common,
    entryPoints: testEntries('test'),
    outdir: 'out',
    outbase: '.',
    sourcemap: 'inline',
    alias: { vscode: './test/mock/vscode.ts' },
  });
  // Helper programs live outside out/test/ so that `node --test out/test/` does not run them.
  await esbuild.build({
    ...common,
    entryPoints: ['test/fixtures/fakeServer.ts'],
    outfile: 'out/fixtures/fakeServer.js',
  });
} else {
  await esbuild.build({
    ...common,
    entryPoints: ['src/extension.ts'],
    outfile: 'dist/extension.js',
    external: ['vscode'],
    minify: production,
    sourcemap: !production,
  });
}
