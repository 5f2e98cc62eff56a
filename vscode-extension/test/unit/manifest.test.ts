import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { test } from 'node:test';
import { COMMANDS } from '../../src/extension';
import { DEFAULT_SERVER_SETTINGS } from '../../src/settings';

const manifest = JSON.parse(readFileSync(resolve(__dirname, '../../../package.json'), 'utf8'));
const properties: Record<string, { default: unknown }> = manifest.contributes.configuration.properties;

test('manifest declares every setting of the server contract', () => {
  const names = [
    'serverPath',
    'pythonPath',
    'model',
    'runtime',
    'device',
    'candidates',
    'maxTokens',
    'deadlineMs',
    'multiline',
    'enable',
    'enabled',
    'isolate',
    'server',
    'apiKey',
  ];
  for (const name of names) assert.ok(properties[`codecomplete.${name}`], `codecomplete.${name}`);
});

test('manifest defaults equal the defaults the code falls back to', () => {
  for (const [key, value] of Object.entries(DEFAULT_SERVER_SETTINGS)) {
    assert.deepEqual(properties[`codecomplete.${key}`].default, value, `codecomplete.${key}`);
  }
});

test('manifest contributes exactly the commands the extension registers', () => {
  const contributed = manifest.contributes.commands.map((c: { command: string }) => c.command).sort();
  assert.deepEqual(contributed, Object.values(COMMANDS).sort());
});

test('manifest points at the bundled entry point and the client engine it needs', () => {
  assert.equal(manifest.main, './dist/extension.js');
  assert.equal(manifest.engines.vscode, '^1.91.0');
});
