// Entry point: wires settings, commands, the status bar and the server controller together.

import * as vscode from 'vscode';
import { languageClientFactory } from './client';
import { ServerController } from './controller';
import { SECTION, readSettings } from './settings';
import { StatusBar } from './statusBar';

export const COMMANDS = {
  enable: 'codecomplete.enableCompletions',
  disable: 'codecomplete.disableCompletions',
  toggle: 'codecomplete.toggleCompletions',
  restart: 'codecomplete.restartServer',
  showLog: 'codecomplete.showLog',
  showMenu: 'codecomplete.showMenu',
} as const;

/** Returned from activate(); tests and other extensions can inspect the live state. */
export interface CodeCompleteApi {
  controller: ServerController;
  status: StatusBar;
  outputChannel: vscode.LogOutputChannel;
}

let active: ServerController | undefined;

export function activate(context: vscode.ExtensionContext): CodeCompleteApi {
  const outputChannel = vscode.window.createOutputChannel('CodeComplete', { log: true });
  const settings = () => readSettings(vscode.workspace.getConfiguration(SECTION));
  const status = new StatusBar(settings().enabled, COMMANDS.showMenu);
  const controller = new ServerController({
    createClient: languageClientFactory(outputChannel),
    readSettings: settings,
    activePython,
    status,
    log: (message) => outputChannel.info(message),
    showError: (message) => void showStartError(message, outputChannel),
  });

  active = controller;
  context.subscriptions.push(
    outputChannel,
    status,
    vscode.commands.registerCommand(COMMANDS.enable, () => setEnabled(true)),
    vscode.commands.registerCommand(COMMANDS.disable, () => setEnabled(false)),
    vscode.commands.registerCommand(COMMANDS.toggle, () => setEnabled(!controller.currentSettings.enabled)),
    vscode.commands.registerCommand(COMMANDS.restart, () => controller.restart()),
    vscode.commands.registerCommand(COMMANDS.showLog, () => outputChannel.show(true)),
    vscode.commands.registerCommand(COMMANDS.showMenu, () => showMenu(controller.currentSettings.enabled)),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (!event.affectsConfiguration(SECTION)) return;
      controller
        .onSettingsChanged((key) => event.affectsConfiguration(`${SECTION}.${key}`))
        .catch((error) => outputChannel.error(`Applying settings: ${error}`));
    }),
  );
  void controller.start();
  return { controller, status, outputChannel };
}

/** VS Code waits for the returned promise: the server gets shutdown/exit before the host ends. */
export function deactivate(): Promise<void> | undefined {
  const controller = active;
  active = undefined;
  return controller?.dispose();
}

/** Flip the global switch where the user's effective value lives (workspace beats user). */
async function setEnabled(enabled: boolean): Promise<void> {
  const config = vscode.workspace.getConfiguration(SECTION);
  const inspected = config.inspect<boolean>('enabled');
  const target =
    inspected?.workspaceFolderValue !== undefined
      ? vscode.ConfigurationTarget.WorkspaceFolder
      : inspected?.workspaceValue !== undefined
        ? vscode.ConfigurationTarget.Workspace
        : vscode.ConfigurationTarget.Global;
  await config.update('enabled', enabled, target);
}

async function showMenu(enabled: boolean): Promise<void> {
  const items: { label: string; command: string }[] = [
    enabled
      ? { label: '$(circle-slash) Disable completions', command: COMMANDS.disable }
      : { label: '$(check) Enable completions', command: COMMANDS.enable },
    { label: '$(debug-restart) Restart server', command: COMMANDS.restart },
    { label: '$(output) Show log', command: COMMANDS.showLog },
    { label: '$(gear) Open settings', command: 'workbench.action.openSettings' },
  ];
  const picked = await vscode.window.showQuickPick(items, { title: 'CodeComplete' });
  if (!picked) return;
  const args = picked.command === 'workbench.action.openSettings' ? [SECTION] : [];
  await vscode.commands.executeCommand(picked.command, ...args);
}

async function showStartError(message: string, outputChannel: vscode.LogOutputChannel): Promise<void> {
  const choice = await vscode.window.showErrorMessage(message, 'Open Settings', 'Show Log');
  if (choice === 'Open Settings') await vscode.commands.executeCommand('workbench.action.openSettings', SECTION);
  if (choice === 'Show Log') outputChannel.show(true);
}

/** The interpreter selected in the Python extension, or python.defaultInterpreterPath. */
async function activePython(): Promise<string | undefined> {
  try {
    const extension = vscode.extensions.getExtension('ms-python.python');
    if (extension) {
      const api = extension.isActive ? extension.exports : await extension.activate();
      const environments = api?.environments;
      const envPath = environments?.getActiveEnvironmentPath?.();
      if (envPath) {
        const resolved = await environments.resolveEnvironment?.(envPath);
        const executable: string | undefined = resolved?.executable?.uri?.fsPath ?? envPath.path;
        if (executable) return executable;
      }
    }
  } catch {
    // The Python extension is optional; fall back to its setting.
  }
  const configured = vscode.workspace.getConfiguration('python').get<string>('defaultInterpreterPath');
  return configured && configured !== 'python' ? configured : undefined;
}
