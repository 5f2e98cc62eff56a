// Where the server executable comes from: user setting, PATH, or a Python environment.

import * as fs from 'node:fs';
import * as path from 'node:path';

export const SERVER_EXECUTABLE = 'codecomplete-lsp';
export const SERVER_MODULE = 'codecomplete.lsp';

export interface ServerCommand {
  command: string;
  args: string[];
  /** How it was found, for the log: "serverPath setting", "PATH", ... */
  source: string;
}

export interface LocateInput {
  serverPath: string;
  pythonPath: string;
  /** The interpreter selected in the Python extension, if any. */
  activePython?: string;
  env: NodeJS.ProcessEnv;
  platform: NodeJS.Platform;
  /** Injected for tests; defaults to checking the file system. */
  isExecutable?: (file: string) => boolean;
}

/** Resolve the server command, or undefined when no candidate exists. */
export function locateServer(input: LocateInput): ServerCommand | undefined {
  const isExecutable = input.isExecutable ?? isExecutableFile;
  if (input.serverPath) {
    return { command: expandHome(input.serverPath, input.env), args: [], source: 'codecomplete.serverPath setting' };
  }
  if (input.pythonPath) {
    return pythonModule(expandHome(input.pythonPath, input.env), 'codecomplete.pythonPath setting');
  }
  const onPath = findOnPath(SERVER_EXECUTABLE, input.env, input.platform, isExecutable);
  if (onPath) return { command: onPath, args: [], source: 'PATH' };
  if (input.activePython) {
    // A console script sits next to the interpreter in venvs and conda envs.
    const sibling = siblingScript(input.activePython, input.platform, isExecutable);
    if (sibling) return { command: sibling, args: [], source: 'Python environment' };
    return pythonModule(input.activePython, 'Python extension interpreter');
  }
  const python = findOnPath(input.platform === 'win32' ? 'python' : 'python3', input.env, input.platform, isExecutable);
  return python ? pythonModule(python, 'python on PATH') : undefined;
}

/** Look a command up on PATH the way a shell would. */
export function findOnPath(
  name: string,
  env: NodeJS.ProcessEnv,
  platform: NodeJS.Platform,
  isExecutable: (file: string) => boolean = isExecutableFile,
): string | undefined {
  const pathApi = platform === 'win32' ? path.win32 : path.posix;
  const pathVar = env.PATH ?? env.Path ?? '';
  const extensions = platform === 'win32' ? (env.PATHEXT ?? '.EXE;.CMD;.BAT').split(';').concat(['']) : [''];
  for (const dir of pathVar.split(pathApi.delimiter)) {
    if (!dir) continue;
    for (const ext of extensions) {
      const candidate = pathApi.join(dir, name + ext);
      if (isExecutable(candidate)) return candidate;
    }
  }
  return undefined;
}

function siblingScript(python: string, platform: NodeJS.Platform, isExecutable: (file: string) => boolean) {
  const pathApi = platform === 'win32' ? path.win32 : path.posix;
  const name = platform === 'win32' ? `${SERVER_EXECUTABLE}.exe` : SERVER_EXECUTABLE;
  const candidate = pathApi.join(pathApi.dirname(python), name);
  return isExecutable(candidate) ? candidate : undefined;
}

function pythonModule(python: string, source: string): ServerCommand {
  return { command: python, args: ['-m', SERVER_MODULE], source };
}

function expandHome(file: string, env: NodeJS.ProcessEnv): string {
  const home = env.HOME ?? env.USERPROFILE;
  return home && (file === '~' || file.startsWith('~/')) ? home + file.slice(1) : file;
}

function isExecutableFile(file: string): boolean {
  try {
    const stat = fs.statSync(file);
    if (!stat.isFile()) return false;
    if (process.platform === 'win32') return true;
    fs.accessSync(file, fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}
