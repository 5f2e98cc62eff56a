// Builds the vscode-languageclient LanguageClient that talks to codecomplete-lsp over stdio.

import type * as vscode from 'vscode';
import {
  LanguageClient,
  RevealOutputChannelOn,
  TransportKind,
  type LanguageClientOptions,
  type Middleware,
  type ServerOptions,
} from 'vscode-languageclient/node';
import type { ClientHooks, ClientFactory } from './controller';
import type { ServerCommand } from './serverCommand';
import { stdioOptions } from './serverLog';
import { SECTION, initializationOptions, type Settings } from './settings';

export const CLIENT_ID = 'codecomplete';
export const CLIENT_NAME = 'CodeComplete';

/** A factory for real clients that log to `outputChannel`. */
export function languageClientFactory(outputChannel: vscode.LogOutputChannel): ClientFactory {
  return (command, settings, hooks) =>
    new LanguageClient(CLIENT_ID, CLIENT_NAME, serverOptions(command), clientOptions(settings, hooks, outputChannel));
}

export function serverOptions(command: ServerCommand): ServerOptions {
  return {
    command: command.command,
    args: command.args,
    transport: TransportKind.stdio,
    options: { env: { ...process.env, PYTHONUNBUFFERED: '1' } },
  };
}

export function clientOptions(
  settings: Settings,
  hooks: ClientHooks,
  outputChannel: vscode.LogOutputChannel,
): LanguageClientOptions {
  return {
    // Every language: the per-language switch is checked per request, so it applies without restart.
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    initializationOptions: initializationOptions(settings.server),
    outputChannel,
    stdioOptions,
    revealOutputChannelOn: RevealOutputChannelOn.Never,
    middleware: middleware(hooks),
  };
}

/**
 * Gate requests on the enable switches; answer `workspace/configuration` with the server settings.
 * The suggestion menu is off unless asked for: VS Code asks for menu items on most keystrokes,
 * and a menu request would supersede the ghost-text request for the same document on the server.
 */
export function middleware(hooks: ClientHooks): Middleware {
  return {
    provideInlineCompletionItems: (document, position, context, token, next) =>
      hooks.shouldComplete(document.languageId) ? next(document, position, context, token) : null,
    provideCompletionItem: (document, position, context, token, next) =>
      hooks.shouldOfferMenu(document.languageId) ? next(document, position, context, token) : null,
    workspace: {
      configuration: async (params, token, next) => {
        const answer = await next(params, token);
        if (!Array.isArray(answer)) return answer;
        return params.items.map((item, index) => (item.section === SECTION ? hooks.serverSettings() : answer[index]));
      },
    },
  };
}
