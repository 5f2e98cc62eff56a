// The server's stderr, line by line, into the log channel at the level the server gave it.

import * as readline from 'node:readline';
import type { Readable } from 'node:stream';

export type LogLevelName = 'debug' | 'info' | 'warn' | 'error';

/** The subset of vscode.LogOutputChannel used here. */
export type LevelLogger = Record<LogLevelName, (message: string) => void>;

// The server's stderr format is "codecomplete-lsp LEVEL logger: message" (lsp/server.py).
const PREFIX = /^codecomplete-lsp (DEBUG|INFO|WARNING|ERROR|CRITICAL) /;

/**
 * Level for one stderr line. DEBUG/INFO go to debug: the server forwards INFO and above as
 * window/logMessage too, which the client logs already. Anything unprefixed (a traceback,
 * a library's print) is an error, as the client's default treats all of stderr.
 */
export function stderrLevel(line: string): LogLevelName {
  const level = PREFIX.exec(line)?.[1];
  if (level === 'DEBUG' || level === 'INFO') return 'debug';
  if (level === 'WARNING') return 'warn';
  return 'error';
}

export function pipeLines(input: Readable, log: (line: string) => void): void {
  readline.createInterface({ input, crlfDelay: Infinity, terminal: false }).on('line', log);
}

export const stdioOptions = {
  stdout: (input: Readable, channel: LevelLogger) => pipeLines(input, (line) => channel.info(line)),
  stderr: (input: Readable, channel: LevelLogger) => pipeLines(input, (line) => channel[stderrLevel(line)](line)),
};
