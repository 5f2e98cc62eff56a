// The status bar item: server state (starting / loading / ready / error / restarting / stopped) and last latency.

import * as vscode from 'vscode';
import type { StatusParams } from './protocol';

/** Server states as the client sees them: the server's own plus the process lifecycle. */
export type ClientState = 'starting' | 'loading' | 'ready' | 'error' | 'restarting' | 'stopped';

export interface StatusView {
  state: ClientState;
  enabled: boolean;
  message?: string;
  latencyMs?: number;
}

export interface StatusText {
  text: string;
  tooltip: string;
  isError: boolean;
}

const ICONS: Record<ClientState, string> = {
  starting: '$(loading~spin)',
  loading: '$(loading~spin)',
  ready: '$(sparkle)',
  error: '$(error)',
  restarting: '$(sync~spin)',
  stopped: '$(debug-stop)',
};

const LABELS: Record<ClientState, string> = {
  starting: 'starting server',
  loading: 'loading model',
  ready: 'ready',
  error: 'error',
  restarting: 'restarting the engine',
  stopped: 'server stopped',
};

/** Text and tooltip for a status; pure so the wording is testable. */
export function describeStatus(view: StatusView): StatusText {
  const icon = view.enabled || view.state === 'error' ? ICONS[view.state] : '$(circle-slash)';
  const latency = view.state === 'ready' && view.latencyMs !== undefined ? ` ${Math.round(view.latencyMs)} ms` : '';
  const lines = [`CodeComplete: ${LABELS[view.state]}${view.enabled ? '' : ' (completions disabled)'}`];
  if (view.message) lines.push(view.message);
  if (view.latencyMs !== undefined) lines.push(`Last completion: ${Math.round(view.latencyMs)} ms`);
  lines.push('Click for the CodeComplete menu.');
  return { text: `${icon} CodeComplete${latency}`, tooltip: lines.join('\n'), isError: view.state === 'error' };
}

/** Fold a server status notification into the current view. */
export function applyServerStatus(view: StatusView, status: StatusParams): StatusView {
  // A model (re)load makes the old latency meaningless; a ready without a figure keeps the last one.
  const latencyMs = status.state === 'loading' || status.state === 'restarting' ? undefined : status.latencyMs ?? view.latencyMs;
  return { ...view, state: status.state, message: status.message, latencyMs };
}

export class StatusBar implements vscode.Disposable {
  private readonly item: vscode.StatusBarItem;
  private view: StatusView;

  constructor(enabled: boolean, command: string) {
    this.item = vscode.window.createStatusBarItem('codecomplete.status', vscode.StatusBarAlignment.Right, 100);
    this.item.name = 'CodeComplete';
    this.item.command = command;
    this.view = { state: 'stopped', enabled };
    this.render();
    this.item.show();
  }

  get current(): StatusView {
    return this.view;
  }

  setState(state: ClientState, message?: string): void {
    const latencyMs = state === 'ready' ? this.view.latencyMs : undefined;
    this.view = { ...this.view, state, message, latencyMs };
    this.render();
  }

  setEnabled(enabled: boolean): void {
    this.view = { ...this.view, enabled };
    this.render();
  }

  onServerStatus(status: StatusParams): void {
    this.view = applyServerStatus(this.view, status);
    this.render();
  }

  dispose(): void {
    this.item.dispose();
  }

  private render(): void {
    const { text, tooltip, isError } = describeStatus(this.view);
    this.item.text = text;
    this.item.tooltip = tooltip;
    this.item.backgroundColor = isError ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  }
}
