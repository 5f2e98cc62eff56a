import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { stderrLevel, stdioOptions, type LevelLogger } from '../../src/serverLog';

test('server log lines keep their level; unprefixed stderr counts as an error', () => {
  assert.equal(stderrLevel('codecomplete-lsp INFO codecomplete.lsp: loaded'), 'debug');
  assert.equal(stderrLevel('codecomplete-lsp DEBUG codecomplete.engine: step'), 'debug');
  assert.equal(stderrLevel('codecomplete-lsp WARNING codecomplete.lsp: bad setting'), 'warn');
  assert.equal(stderrLevel('codecomplete-lsp ERROR codecomplete.lsp: load failed'), 'error');
  assert.equal(stderrLevel('Traceback (most recent call last):'), 'error');
});

test('stderr is split into lines and logged by level', async () => {
  const logged: string[] = [];
  const at = (level: string) => (line: string) => void logged.push(`${level}: ${line}`);
  const channel: LevelLogger = { debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error') };
  const stderr = new PassThrough();
  stdioOptions.stderr(stderr, channel);
  stderr.end('codecomplete-lsp WARNING x: careful\nModuleNotFoundError: No module named codecomplete\n');
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(logged, [
    'warn: codecomplete-lsp WARNING x: careful',
    'error: ModuleNotFoundError: No module named codecomplete',
  ]);
});
