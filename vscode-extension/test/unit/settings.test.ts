import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  DEFAULT_SERVER_SETTINGS,
  isLanguageEnabled,
  readSettings,
  settingsNotification,
  type ConfigReader,
} from '../../src/settings';

function config(values: Record<string, unknown>): ConfigReader {
  return { get: <T>(key: string) => values[key] as T | undefined };
}

test('unset settings fall back to the documented defaults', () => {
  const settings = readSettings(config({}));
  assert.equal(settings.enabled, true);
  assert.equal(settings.serverPath, '');
  assert.deepEqual(settings.server, DEFAULT_SERVER_SETTINGS);
});

test('server settings carry exactly the contract keys', () => {
  const settings = readSettings(
    config({
      model: ' /models/qwen ',
      runtime: 'torch',
      device: 'cuda',
      candidates: 8,
      maxTokens: 128,
      deadlineMs: 250,
      multiline: 'never',
      enable: { '*': false, python: true },
      serverPath: '/opt/bin/codecomplete-lsp',
      enabled: false,
    }),
  );
  assert.deepEqual(settingsNotification(settings.server), {
    settings: {
      codecomplete: {
        model: '/models/qwen',
        runtime: 'torch',
        device: 'cuda',
        candidates: 8,
        maxTokens: 128,
        deadlineMs: 250,
        multiline: 'never',
        enable: { '*': false, python: true },
        isolate: true,
        server: '',
        apiKey: '',
      },
    },
  });
  assert.equal(settings.enabled, false);
  assert.equal(settings.serverPath, '/opt/bin/codecomplete-lsp');
});

test('out-of-range and mistyped values are clamped or replaced by defaults', () => {
  const settings = readSettings(
    config({ candidates: 99, maxTokens: -3, deadlineMs: 'soon', runtime: 'tensorflow', device: 7, multiline: true, enable: [1] }),
  );
  assert.equal(settings.server.candidates, 16);
  assert.equal(settings.server.maxTokens, 1);
  assert.equal(settings.server.deadlineMs, DEFAULT_SERVER_SETTINGS.deadlineMs);
  assert.equal(settings.server.runtime, 'onnx');
  assert.equal(settings.server.multiline, 'auto');
  assert.equal(settings.server.device, 'cpu');
  assert.deepEqual(settings.server.enable, DEFAULT_SERVER_SETTINGS.enable);
});

test('per-language map without a star defaults other languages to on', () => {
  const settings = readSettings(config({ enable: { markdown: false, go: 'yes' } }));
  assert.deepEqual(settings.server.enable, { markdown: false, '*': true });
});

test('language switch uses its own entry before the star default', () => {
  const enable = { '*': false, python: true, markdown: false };
  assert.equal(isLanguageEnabled(enable, 'python'), true);
  assert.equal(isLanguageEnabled(enable, 'markdown'), false);
  assert.equal(isLanguageEnabled(enable, 'rust'), false);
  assert.equal(isLanguageEnabled({ '*': true, plaintext: false }, 'rust'), true);
  assert.equal(isLanguageEnabled({}, 'rust'), true);
});

test('remote mode: server URL and API key pass through, a bad URL means the local engine', () => {
  const remote = readSettings(config({ server: ' https://complete.example.com/ ', apiKey: ' sk-123 ', isolate: false }));
  assert.equal(remote.server.server, 'https://complete.example.com');
  assert.equal(remote.server.apiKey, 'sk-123');
  assert.equal(remote.server.isolate, false);
  assert.equal(settingsNotification(remote.server).settings.codecomplete.server, 'https://complete.example.com');
  for (const bad of ['complete.example.com', 'ftp://x', 42, 'http://']) {
    assert.equal(readSettings(config({ server: bad })).server.server, '', String(bad));
  }
  assert.equal(readSettings(config({ apiKey: 7 })).server.apiKey, '');
});
