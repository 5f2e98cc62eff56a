// Owns the server process: start, stop, restart, settings push, status updates.

import type * as vscode from 'vscode';
import { State } from 'vscode-languageclient';
import { STATUS_NOTIFICATION, parseStatus } from './protocol';
import { locateServer, type ServerCommand } from './serverCommand';
import { isLanguageEnabled, settingsNotification, type ServerSettings, type Settings } from './settings';
import type { ClientState, StatusBar } from './statusBar';

/** The part of vscode-languageclient's LanguageClient the controller uses. */
export interface CompletionClient {
  start(): Promise<void>;
  stop(timeoutMs?: number): Promise<void>;
  sendNotification(method: string, params: unknown): Promise<void>;
  onNotification(method: string, handler: (params: unknown) => void): vscode.Disposable;
  onDidChangeState(listener: (event: { oldState: State; newState: State }) => void): vscode.Disposable;
}

/** What the client's middleware asks the controller on every request. */
export interface ClientHooks {
  shouldComplete(languageId: string): boolean;
  shouldOfferMenu(languageId: string): boolean;
  serverSettings(): ServerSettings;
}

export type ClientFactory = (command: ServerCommand, settings: Settings, hooks: ClientHooks) => CompletionClient;

export interface ControllerDeps {
  createClient: ClientFactory;
  readSettings: () => Settings;
  /** Interpreter chosen in the Python extension, if it is installed. */
  activePython: () => Promise<string | undefined>;
  status: StatusBar;
  log: (message: string) => void;
  /** Tell the user that the server could not start. */
  showError: (message: string) => void;
  env?: NodeJS.ProcessEnv;
  platform?: NodeJS.Platform;
}

export const DID_CHANGE_CONFIGURATION = 'workspace/didChangeConfiguration';

export class ServerController {
  private client: CompletionClient | undefined;
  private subscriptions: vscode.Disposable[] = [];
  private settings: Settings;
  /** Serialises start/stop/restart so that commands in quick succession do not interleave. */
  private queue: Promise<void> = Promise.resolve();
  private serverStatusSeen = false;
  private lastError: string | undefined;

  constructor(private readonly deps: ControllerDeps) {
    this.settings = deps.readSettings();
  }

  get running(): boolean {
    return this.client !== undefined;
  }

  get currentSettings(): Settings {
    return this.settings;
  }

  start(): Promise<void> {
    return this.enqueue(() => this.doStart());
  }

  stop(): Promise<void> {
    return this.enqueue(() => this.doStop());
  }

  restart(): Promise<void> {
    return this.enqueue(async () => {
      await this.doStop();
      await this.doStart();
    });
  }

  /** React to a settings change: restart for a new executable, push everything else live. */
  async onSettingsChanged(affects: (key: string) => boolean): Promise<void> {
    const previous = this.settings;
    this.settings = this.deps.readSettings();
    this.deps.status.setEnabled(this.settings.enabled);
    if (affects('serverPath') || affects('pythonPath')) {
      if (previous.serverPath !== this.settings.serverPath || previous.pythonPath !== this.settings.pythonPath) {
        this.deps.log('Server location changed; restarting the server.');
        return this.restart();
      }
    }
    if (this.client && JSON.stringify(previous.server) !== JSON.stringify(this.settings.server)) {
      this.deps.log(`Sending settings to the server: ${JSON.stringify(this.settings.server)}`);
      await this.client.sendNotification(DID_CHANGE_CONFIGURATION, settingsNotification(this.settings.server));
    }
  }

  /** Whether a request for this language should reach the server at all. */
  shouldComplete(languageId: string): boolean {
    return this.settings.enabled && isLanguageEnabled(this.settings.server.enable, languageId);
  }

  dispose(): Promise<void> {
    return this.stop();
  }

  private enqueue(work: () => Promise<void>): Promise<void> {
    const next = this.queue.then(work, work);
    this.queue = next.catch(() => undefined);
    return next;
  }

  private async doStart(): Promise<void> {
    if (this.client) return;
    const { status, log } = this.deps;
    this.settings = this.deps.readSettings();
    status.setEnabled(this.settings.enabled);
    const command = locateServer({
      serverPath: this.settings.serverPath,
      pythonPath: this.settings.pythonPath,
      activePython: this.settings.serverPath || this.settings.pythonPath ? undefined : await this.deps.activePython(),
      env: this.deps.env ?? process.env,
      platform: this.deps.platform ?? process.platform,
    });
    if (!command) {
      this.fail('Cannot find the codecomplete server: set codecomplete.serverPath or codecomplete.pythonPath.');
      return;
    }
    log(`Starting ${[command.command, ...command.args].join(' ')} (from ${command.source}).`);
    status.setState('starting');
    this.serverStatusSeen = false;
    this.lastError = undefined;
    const client = this.deps.createClient(command, this.settings, {
      shouldComplete: (languageId) => this.shouldComplete(languageId),
      shouldOfferMenu: (languageId) => this.settings.completionMenu && this.shouldComplete(languageId),
      serverSettings: () => this.settings.server,
    });
    this.client = client;
    this.subscriptions = [
      client.onNotification(STATUS_NOTIFICATION, (params) => this.onServerStatus(params)),
      client.onDidChangeState(({ newState }) => this.onClientState(client, newState)),
    ];
    try {
      await client.start();
    } catch (error) {
      this.disposeSubscriptions();
      this.client = undefined;
      await client.stop().catch(() => undefined);
      this.fail(`The codecomplete server did not start: ${errorMessage(error)}`);
    }
  }

  private async doStop(): Promise<void> {
    const client = this.client;
    if (!client) return;
    this.client = undefined;
    this.disposeSubscriptions();
    try {
      await client.stop();
    } catch (error) {
      this.deps.log(`Stopping the server: ${errorMessage(error)}`);
    }
    this.deps.status.setState('stopped');
  }

  private onServerStatus(params: unknown): void {
    const status = parseStatus(params);
    if (!status) {
      this.deps.log(`Ignoring malformed ${STATUS_NOTIFICATION}: ${JSON.stringify(params)}`);
      return;
    }
    this.serverStatusSeen = true;
    if (status.state === 'error') {
      this.lastError = status.message;
      this.deps.log(`Server error: ${status.message ?? '(no message)'}`);
    }
    this.deps.status.onServerStatus(status);
  }

  private onClientState(client: CompletionClient, state: State): void {
    if (client !== this.client) return;
    const next: ClientState | undefined =
      state === State.Starting ? 'starting' : state === State.Stopped ? 'error' : undefined;
    if (state === State.Starting) this.serverStatusSeen = false;
    if (state === State.Running && !this.serverStatusSeen) {
      // The server reports `ready` itself once the model is loaded.
      this.deps.status.setState('loading');
    } else if (next === 'error') {
      // Stopped without our asking: the process died and the client gave up restarting it.
      this.deps.status.setState('error', this.lastError ?? 'The server stopped; see the log.');
    } else if (next) {
      this.deps.status.setState(next);
    }
  }

  private fail(message: string): void {
    this.deps.log(message);
    this.deps.status.setState('error', message);
    this.deps.showError(message);
  }

  private disposeSubscriptions(): void {
    for (const subscription of this.subscriptions) subscription.dispose();
    this.subscriptions = [];
  }
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
