import assert from 'node:assert/strict';
import { test } from 'node:test';
import { findOnPath, locateServer } from '../../src/serverCommand';

const executables = (...files: string[]) => (file: string) => files.includes(file);

const base = {
  serverPath: '',
  pythonPath: '',
  env: { PATH: '/usr/local/bin:/usr/bin', HOME: '/home/ada' },
  platform: 'linux' as const,
};

test('serverPath setting wins over everything and expands ~', () => {
  const command = locateServer({
    ...base,
    serverPath: '~/venv/bin/codecomplete-lsp',
    pythonPath: '/usr/bin/python3',
    isExecutable: executables('/usr/bin/codecomplete-lsp'),
  });
  assert.deepEqual(command, {
    command: '/home/ada/venv/bin/codecomplete-lsp',
    args: [],
    source: 'codecomplete.serverPath setting',
  });
});

test('pythonPath setting runs the server module', () => {
  const command = locateServer({ ...base, pythonPath: '/opt/py/bin/python', isExecutable: executables() });
  assert.equal(command?.command, '/opt/py/bin/python');
  assert.deepEqual(command?.args, ['-m', 'codecomplete.lsp']);
});

test('console script on PATH comes before the Python extension interpreter', () => {
  const command = locateServer({
    ...base,
    activePython: '/home/ada/venv/bin/python',
    isExecutable: executables('/usr/bin/codecomplete-lsp', '/home/ada/venv/bin/codecomplete-lsp'),
  });
  assert.equal(command?.command, '/usr/bin/codecomplete-lsp');
  assert.equal(command?.source, 'PATH');
});

test('console script next to the selected interpreter is used', () => {
  const command = locateServer({
    ...base,
    activePython: '/home/ada/venv/bin/python',
    isExecutable: executables('/home/ada/venv/bin/codecomplete-lsp'),
  });
  assert.deepEqual(command?.args, []);
  assert.equal(command?.command, '/home/ada/venv/bin/codecomplete-lsp');
});

test('selected interpreter without the script runs the module', () => {
  const command = locateServer({ ...base, activePython: '/home/ada/venv/bin/python', isExecutable: executables() });
  assert.deepEqual(command, {
    command: '/home/ada/venv/bin/python',
    args: ['-m', 'codecomplete.lsp'],
    source: 'Python extension interpreter',
  });
});

test('python3 on PATH is the last resort, and nothing at all gives undefined', () => {
  const command = locateServer({ ...base, isExecutable: executables('/usr/bin/python3') });
  assert.equal(command?.command, '/usr/bin/python3');
  assert.equal(locateServer({ ...base, isExecutable: executables() }), undefined);
});

test('PATH lookup on Windows tries PATHEXT suffixes', () => {
  const found = findOnPath(
    'codecomplete-lsp',
    { Path: 'C:\\Python\\Scripts;C:\\Windows', PATHEXT: '.COM;.EXE' },
    'win32',
    executables('C:\\Python\\Scripts\\codecomplete-lsp.EXE'),
  );
  assert.equal(found, 'C:\\Python\\Scripts\\codecomplete-lsp.EXE');
});
