// A small in-memory stand-in for the `vscode` module: enough of the API for the extension
// and for vscode-languageclient to start, sync documents and serve inline completions.
// Tests drive it through the exported `mock` object.

/* eslint-disable @typescript-eslint/no-explicit-any */

export const version = '1.91.0';

// ---------------------------------------------------------------- basic types

export class Disposable {
  static from(...items: { dispose(): unknown }[]): Disposable {
    return new Disposable(() => items.forEach((item) => item.dispose()));
  }
  constructor(private readonly callOnDispose: () => unknown = () => undefined) {}
  dispose(): void {
    this.callOnDispose();
  }
}

export type Event<T> = (listener: (e: T) => unknown, thisArgs?: unknown, disposables?: Disposable[]) => Disposable;

export class EventEmitter<T> {
  private listeners = new Set<(e: T) => unknown>();
  readonly event: Event<T> = (listener, thisArgs, disposables) => {
    const bound = (e: T) => listener.call(thisArgs, e);
    this.listeners.add(bound);
    const disposable = new Disposable(() => this.listeners.delete(bound));
    disposables?.push(disposable);
    return disposable;
  };
  fire(e: T): void {
    for (const listener of [...this.listeners]) listener(e);
  }
  dispose(): void {
    this.listeners.clear();
  }
}

export class CancellationError extends Error {
  constructor() {
    super('Canceled');
    this.name = 'Canceled';
  }
}

export class CancellationTokenSource {
  private emitter = new EventEmitter<void>();
  private cancelled = false;
  readonly token = {
    isCancellationRequested: false,
    onCancellationRequested: this.emitter.event,
  };
  cancel(): void {
    if (this.cancelled) return;
    this.cancelled = true;
    this.token.isCancellationRequested = true;
    this.emitter.fire();
  }
  dispose(): void {
    this.emitter.dispose();
  }
}

export class Uri {
  private constructor(
    readonly scheme: string,
    readonly authority: string,
    readonly path: string,
    readonly query = '',
    readonly fragment = '',
  ) {}
  static file(path: string): Uri {
    return new Uri('file', '', path);
  }
  static parse(value: string): Uri {
    const match = /^([a-zA-Z][\w+.-]*):(?:\/\/([^/]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$/.exec(value);
    if (!match) return new Uri('file', '', value);
    return new Uri(match[1], match[2] ?? '', decodeURIComponent(match[3]), match[4] ?? '', match[5] ?? '');
  }
  static from(parts: { scheme: string; authority?: string; path?: string; query?: string; fragment?: string }): Uri {
    return new Uri(parts.scheme, parts.authority ?? '', parts.path ?? '', parts.query ?? '', parts.fragment ?? '');
  }
  get fsPath(): string {
    return this.path;
  }
  with(change: Partial<{ scheme: string; authority: string; path: string; query: string; fragment: string }>): Uri {
    return new Uri(
      change.scheme ?? this.scheme,
      change.authority ?? this.authority,
      change.path ?? this.path,
      change.query ?? this.query,
      change.fragment ?? this.fragment,
    );
  }
  toString(): string {
    const authority = this.scheme === 'file' || this.authority ? `//${this.authority}` : '';
    return `${this.scheme}:${authority}${this.path}${this.query ? `?${this.query}` : ''}${this.fragment ? `#${this.fragment}` : ''}`;
  }
  toJSON(): unknown {
    return { scheme: this.scheme, authority: this.authority, path: this.path };
  }
}

export class Position {
  constructor(
    readonly line: number,
    readonly character: number,
  ) {}
  isEqual(other: Position): boolean {
    return this.line === other.line && this.character === other.character;
  }
}

export class Range {
  readonly start: Position;
  readonly end: Position;
  constructor(startOrLine: Position | number, endOrCharacter: Position | number, endLine?: number, endCharacter?: number) {
    if (typeof startOrLine === 'number') {
      this.start = new Position(startOrLine, endOrCharacter as number);
      this.end = new Position(endLine as number, endCharacter as number);
    } else {
      this.start = startOrLine;
      this.end = endOrCharacter as Position;
    }
  }
  get isEmpty(): boolean {
    return this.start.isEqual(this.end);
  }
}

export class Selection extends Range {}

export class TextEdit {
  constructor(
    readonly range: Range,
    readonly newText: string,
  ) {}
}

export class SnippetString {
  constructor(readonly value = '') {}
}

export class MarkdownString {
  constructor(
    public value = '',
    public supportThemeIcons = false,
  ) {}
}

export class ThemeColor {
  constructor(readonly id: string) {}
}

export class InlineCompletionItem {
  constructor(
    public insertText: string | SnippetString,
    public range?: Range,
    public command?: unknown,
  ) {}
  filterText?: string;
}

export class InlineCompletionList {
  constructor(public items: InlineCompletionItem[]) {}
}

export class CompletionItem {
  constructor(
    public label: string,
    public kind?: number,
  ) {}
}

export class CompletionList {
  constructor(
    public items: CompletionItem[] = [],
    public isIncomplete = false,
  ) {}
}

// Classes vscode-languageclient subclasses at load time; the tests never build them.
export class CallHierarchyItem {}
export class TypeHierarchyItem {}
export class CodeLens {}
export class DocumentLink {}
export class InlayHint {}
export class SymbolInformation {}
export class CodeAction {}
export class Diagnostic {}

export class RelativePattern {
  constructor(
    readonly base: unknown,
    readonly pattern: string,
  ) {}
}

export class TabInputText {}
export class TabInputTextDiff {}
export class TabInputNotebook {}
export class TabInputCustom {}

export enum StatusBarAlignment {
  Left = 1,
  Right = 2,
}
export enum ConfigurationTarget {
  Global = 1,
  Workspace = 2,
  WorkspaceFolder = 3,
}
export enum InlineCompletionTriggerKind {
  Invoke = 0,
  Automatic = 1,
}
export enum CompletionTriggerKind {
  Invoke = 0,
  TriggerCharacter = 1,
  TriggerForIncompleteCompletions = 2,
}
export enum LogLevel {
  Off = 0,
  Trace = 1,
  Debug = 2,
  Info = 3,
  Warning = 4,
  Error = 5,
}
export enum ProgressLocation {
  SourceControl = 1,
  Window = 10,
  Notification = 15,
}
export enum TextDocumentSaveReason {
  Manual = 1,
  AfterDelay = 2,
  FocusOut = 3,
}
export enum EndOfLine {
  LF = 1,
  CRLF = 2,
}
export enum FileType {
  Unknown = 0,
  File = 1,
  Directory = 2,
  SymbolicLink = 64,
}
// Enums only the converters of features these tests never exercise touch.
export const CompletionItemKind = new Proxy({}, { get: (_target, key) => (typeof key === 'string' ? 0 : undefined) });
export const CompletionItemTag = { Deprecated: 1 };
export const DiagnosticSeverity = { Error: 0, Warning: 1, Information: 2, Hint: 3 };
export const DiagnosticTag = { Unnecessary: 1, Deprecated: 2 };
export const SymbolKind = CompletionItemKind;
export const SymbolTag = { Deprecated: 1 };
export const CodeActionKind = { Empty: { value: '' } };
export const CodeActionTriggerKind = { Invoke: 1, Automatic: 2 };
export const SignatureHelpTriggerKind = { Invoke: 1, TriggerCharacter: 2, ContentChange: 3 };
export const DocumentHighlightKind = { Text: 0, Read: 1, Write: 2 };
export const FoldingRangeKind = { Comment: 1, Imports: 2, Region: 3 };

// ---------------------------------------------------------------- documents

export class MockTextDocument {
  readonly isClosed = false;
  readonly isUntitled = false;
  readonly isDirty = false;
  readonly eol = EndOfLine.LF;
  constructor(
    readonly uri: Uri,
    readonly languageId: string,
    public version: number,
    private text: string,
  ) {}
  get fileName(): string {
    return this.uri.fsPath;
  }
  get lineCount(): number {
    return this.text.split('\n').length;
  }
  getText(): string {
    return this.text;
  }
  offsetAt(position: Position): number {
    const lines = this.text.split('\n');
    let offset = 0;
    for (let line = 0; line < position.line && line < lines.length; line++) offset += lines[line].length + 1;
    return offset + position.character;
  }
  positionAt(offset: number): Position {
    const before = this.text.slice(0, offset).split('\n');
    return new Position(before.length - 1, before[before.length - 1].length);
  }
}

// ---------------------------------------------------------------- configuration

type SettingsStore = Map<string, unknown>;

class MockConfiguration {
  constructor(
    private readonly section: string,
    private readonly store: SettingsStore,
  ) {}
  private key(key: string): string {
    return this.section ? `${this.section}.${key}` : key;
  }
  get<T>(key: string, defaultValue?: T): T | undefined {
    const full = this.key(key);
    if (this.store.has(full)) return this.store.get(full) as T;
    // Whole sub-sections (the client's configuration feature reads `codecomplete` at once).
    const prefix = `${full}.`;
    const nested: Record<string, unknown> = {};
    let found = false;
    for (const [name, value] of this.store) {
      if (name.startsWith(prefix)) {
        nested[name.slice(prefix.length)] = value;
        found = true;
      }
    }
    return found ? (nested as T) : defaultValue;
  }
  has(key: string): boolean {
    return this.get(key) !== undefined;
  }
  inspect<T>(key: string): { key: string; globalValue?: T } {
    return { key: this.key(key), globalValue: this.store.get(this.key(key)) as T | undefined };
  }
  async update(key: string, value: unknown): Promise<void> {
    mock.setSettings({ [this.key(key)]: value });
  }
}

// ---------------------------------------------------------------- namespaces

function registrar(kind: string) {
  return (...args: unknown[]) => {
    mock.registrations.push({ kind, args });
    return new Disposable(() => {
      const index = mock.registrations.findIndex((r) => r.args === args);
      if (index >= 0) mock.registrations.splice(index, 1);
    });
  };
}

/** A namespace object whose unknown `registerX`/`onDidX` members are harmless no-ops. */
function namespace<T extends object>(known: T): T & Record<string, any> {
  return new Proxy(known as T & Record<string, any>, {
    get(target, key) {
      if (key in target || typeof key !== 'string') return (target as any)[key];
      if (key.startsWith('register') || key.startsWith('create')) return registrar(key);
      if (key.startsWith('on')) return new EventEmitter<unknown>().event;
      return undefined;
    },
  });
}

function matchScore(selector: any, document: MockTextDocument): number {
  if (Array.isArray(selector)) return Math.max(0, ...selector.map((s) => matchScore(s, document)));
  if (typeof selector === 'string') return selector === '*' || selector === document.languageId ? 10 : 0;
  if (selector.language && selector.language !== '*' && selector.language !== document.languageId) return 0;
  if (selector.scheme && selector.scheme !== '*' && selector.scheme !== document.uri.scheme) return 0;
  return selector.language === document.languageId ? 10 : 5;
}

const events = {
  didOpen: new EventEmitter<MockTextDocument>(),
  didClose: new EventEmitter<MockTextDocument>(),
  didChange: new EventEmitter<unknown>(),
  didChangeConfiguration: new EventEmitter<{ affectsConfiguration(section: string): boolean }>(),
};

export const languages = namespace({
  match: (selector: unknown, document: MockTextDocument) => matchScore(selector, document),
  createDiagnosticCollection: () => ({ set() {}, delete() {}, clear() {}, dispose() {}, forEach() {} }),
});

export const workspace = namespace({
  textDocuments: [] as MockTextDocument[],
  notebookDocuments: [] as unknown[],
  workspaceFolders: undefined as unknown,
  getConfiguration: (section = '') => new MockConfiguration(section, mock.settings),
  onDidOpenTextDocument: events.didOpen.event,
  onDidCloseTextDocument: events.didClose.event,
  onDidChangeTextDocument: events.didChange.event,
  onDidChangeConfiguration: events.didChangeConfiguration.event,
  createFileSystemWatcher: () => ({
    onDidCreate: new EventEmitter().event,
    onDidChange: new EventEmitter().event,
    onDidDelete: new EventEmitter().event,
    dispose() {},
  }),
  applyEdit: async () => true,
});

export class MockOutputChannel {
  readonly lines: string[] = [];
  shown = false;
  constructor(readonly name: string) {}
  append(value: string): void {
    this.lines.push(value);
  }
  appendLine(value: string): void {
    this.lines.push(value);
  }
  trace = (message: string) => this.lines.push(`[trace] ${message}`);
  debug = (message: string) => this.lines.push(`[debug] ${message}`);
  info = (message: string) => this.lines.push(`[info] ${message}`);
  warn = (message: string) => this.lines.push(`[warn] ${message}`);
  error = (message: string | Error) => this.lines.push(`[error] ${message}`);
  logLevel = LogLevel.Info;
  onDidChangeLogLevel = new EventEmitter<LogLevel>().event;
  clear(): void {
    this.lines.length = 0;
  }
  show(): void {
    this.shown = true;
  }
  hide(): void {}
  replace(value: string): void {
    this.lines.splice(0, this.lines.length, value);
  }
  dispose(): void {}
}

export class MockStatusBarItem {
  text = '';
  tooltip: unknown = '';
  name = '';
  command: unknown;
  backgroundColor: ThemeColor | undefined;
  visible = false;
  constructor(
    readonly id: string,
    readonly alignment: StatusBarAlignment,
    readonly priority: number,
  ) {}
  show(): void {
    this.visible = true;
  }
  hide(): void {
    this.visible = false;
  }
  dispose(): void {
    this.visible = false;
  }
}

export const window = namespace({
  activeTextEditor: undefined as unknown,
  visibleTextEditors: [] as unknown[],
  tabGroups: { all: [] as unknown[], onDidChangeTabs: new EventEmitter().event, onDidChangeTabGroups: new EventEmitter().event },
  createOutputChannel: (name: string) => {
    const channel = new MockOutputChannel(name);
    mock.outputChannels.push(channel);
    return channel;
  },
  createStatusBarItem: (id: string, alignment: StatusBarAlignment, priority: number) => {
    const item = new MockStatusBarItem(id, alignment, priority);
    mock.statusBarItems.push(item);
    return item;
  },
  showErrorMessage: async (message: string) => {
    mock.messages.push({ level: 'error', message });
    return undefined;
  },
  showWarningMessage: async (message: string) => {
    mock.messages.push({ level: 'warning', message });
    return undefined;
  },
  showInformationMessage: async (message: string) => {
    mock.messages.push({ level: 'info', message });
    return undefined;
  },
  showQuickPick: async () => undefined,
  showTextDocument: async () => undefined,
  withProgress: async (_options: unknown, task: (progress: unknown, token: unknown) => Promise<unknown>) =>
    task({ report() {} }, new CancellationTokenSource().token),
});

export const commands = {
  registerCommand: (id: string, handler: (...args: any[]) => unknown) => {
    mock.commands.set(id, handler);
    return new Disposable(() => mock.commands.delete(id));
  },
  executeCommand: async (id: string, ...args: unknown[]) => {
    mock.executedCommands.push({ id, args });
    return mock.commands.get(id)?.(...args);
  },
};

export const extensions = {
  getExtension: (_id: string) => undefined,
};

export const env = {
  appName: 'Mock Code',
  language: 'en',
  machineId: 'mock',
  openExternal: async () => true,
};

// ---------------------------------------------------------------- test control

export const mock = {
  settings: new Map<string, unknown>() as SettingsStore,
  registrations: [] as { kind: string; args: unknown[] }[],
  outputChannels: [] as MockOutputChannel[],
  statusBarItems: [] as MockStatusBarItem[],
  messages: [] as { level: string; message: string }[],
  commands: new Map<string, (...args: any[]) => unknown>(),
  executedCommands: [] as { id: string; args: unknown[] }[],

  /** Set `section.key` values and fire onDidChangeConfiguration like the editor does. */
  setSettings(values: Record<string, unknown>): void {
    for (const [key, value] of Object.entries(values)) {
      if (value === undefined) this.settings.delete(key);
      else this.settings.set(key, value);
    }
    const changed = Object.keys(values);
    events.didChangeConfiguration.fire({
      affectsConfiguration: (section: string) =>
        changed.some((key) => key === section || key.startsWith(`${section}.`) || section.startsWith(`${key}.`)),
    });
  },

  /** Open a document as the editor would: it appears in textDocuments and didOpen fires. */
  openDocument(path: string, languageId: string, text: string): MockTextDocument {
    const document = new MockTextDocument(Uri.file(path), languageId, 1, text);
    workspace.textDocuments.push(document);
    events.didOpen.fire(document);
    return document;
  },

  providers(kind: string): unknown[] {
    return this.registrations.filter((r) => r.kind === kind).map((r) => r.args[1]);
  },

  reset(): void {
    this.settings.clear();
    this.registrations.length = 0;
    this.outputChannels.length = 0;
    this.statusBarItems.length = 0;
    this.messages.length = 0;
    this.commands.clear();
    this.executedCommands.length = 0;
    workspace.textDocuments.length = 0;
  },
};
