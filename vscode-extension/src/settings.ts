// The extension's settings, and the part of them the server sees.

/** Section name in VS Code settings and in `{"settings": {...}}` sent to the server. */
export const SECTION = 'codecomplete';

export type Runtime = 'onnx' | 'torch';
export type Device = 'cpu' | 'cuda';
/** auto: the server decides from the syntax at the cursor; never: one line; always: may run past it. */
export type Multiline = 'auto' | 'always' | 'never';

/** Per-language switch: languageId -> enabled, with `*` as the default. */
export type LanguageEnable = Record<string, boolean>;

/** Exactly the keys of the server contract (initializationOptions / didChangeConfiguration). */
export interface ServerSettings {
  model: string;
  runtime: Runtime;
  device: Device;
  candidates: number;
  maxTokens: number;
  deadlineMs: number;
  multiline: Multiline;
  enable: LanguageEnable;
  /** The local engine in a child process (a runtime crash restarts it instead of ending the server). */
  isolate: boolean;
  /** The team service's URL; '' = the local engine. */
  server: string;
  /** Bearer token for `server`. */
  apiKey: string;
}

/** Everything the extension reads from `codecomplete.*`. */
export interface Settings {
  enabled: boolean;
  /** Also send textDocument/completion (the suggestion menu); off: ghost text only. */
  completionMenu: boolean;
  serverPath: string;
  pythonPath: string;
  server: ServerSettings;
}

/** The slice of vscode.WorkspaceConfiguration that settings need. */
export interface ConfigReader {
  get<T>(key: string): T | undefined;
}

export const DEFAULT_ENABLE: LanguageEnable = { '*': true, markdown: false, plaintext: false };

export const DEFAULT_SERVER_SETTINGS: ServerSettings = {
  model: '',
  runtime: 'onnx',
  device: 'cpu',
  candidates: 4,
  maxTokens: 48,
  deadlineMs: 1000,
  multiline: 'auto',
  enable: DEFAULT_ENABLE,
  isolate: true,
  server: '',
  apiKey: '',
};

/** Settings whose change needs a new server process (everything else is pushed live). */
export const RESTART_KEYS = ['serverPath', 'pythonPath'] as const;

/** Read and sanitise `codecomplete.*` from a configuration section. */
export function readSettings(config: ConfigReader): Settings {
  const d = DEFAULT_SERVER_SETTINGS;
  return {
    enabled: config.get<boolean>('enabled') ?? true,
    completionMenu: config.get<boolean>('completionMenu') ?? false,
    serverPath: stringOr(config.get('serverPath'), '').trim(),
    pythonPath: stringOr(config.get('pythonPath'), '').trim(),
    server: {
      model: stringOr(config.get('model'), d.model).trim(),
      runtime: oneOf(config.get('runtime'), ['onnx', 'torch'] as const, d.runtime),
      device: oneOf(config.get('device'), ['cpu', 'cuda'] as const, d.device),
      candidates: clampInt(config.get('candidates'), 1, 16, d.candidates),
      maxTokens: clampInt(config.get('maxTokens'), 1, 4096, d.maxTokens),
      deadlineMs: clampInt(config.get('deadlineMs'), 1, 600_000, d.deadlineMs),
      multiline: oneOf(config.get('multiline'), ['auto', 'always', 'never'] as const, d.multiline),
      enable: languageEnable(config.get('enable')),
      isolate: config.get<boolean>('isolate') ?? d.isolate,
      server: serverUrl(config.get('server')),
      apiKey: stringOr(config.get('apiKey'), d.apiKey).trim(),
    },
  };
}

/** Params of workspace/didChangeConfiguration: `{"settings": {"codecomplete": {...}}}`. */
export function settingsNotification(server: ServerSettings): { settings: { [SECTION]: ServerSettings } } {
  return { settings: initializationOptions(server) };
}

/** initializationOptions: the same `settings` value, `{"codecomplete": {...}}`. */
export function initializationOptions(server: ServerSettings): { [SECTION]: ServerSettings } {
  return { [SECTION]: server };
}

/** Whether completions are on for a language under a per-language map. */
export function isLanguageEnabled(enable: LanguageEnable, languageId: string): boolean {
  if (Object.prototype.hasOwnProperty.call(enable, languageId)) return enable[languageId];
  return enable['*'] ?? true;
}

function languageEnable(value: unknown): LanguageEnable {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return { ...DEFAULT_ENABLE };
  const result: LanguageEnable = {};
  for (const [languageId, on] of Object.entries(value)) {
    if (typeof on === 'boolean') result[languageId] = on;
  }
  if (!('*' in result)) result['*'] = true;
  return result;
}

/** An http(s) URL without a trailing slash, or '' (also for anything that is not one). */
function serverUrl(value: unknown): string {
  const url = stringOr(value, '').trim().replace(/\/+$/, '');
  return /^https?:\/\/[^/\s]+/.test(url) ? url : '';
}

function stringOr(value: unknown, fallback: string): string {
  return typeof value === 'string' ? value : fallback;
}

function oneOf<T extends string>(value: unknown, allowed: readonly T[], fallback: T): T {
  return allowed.includes(value as T) ? (value as T) : fallback;
}

function clampInt(value: unknown, min: number, max: number, fallback: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value)) return fallback;
  return Math.min(max, Math.max(min, Math.round(value)));
}
