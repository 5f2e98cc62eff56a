// Messages of the codecomplete server beyond plain LSP.

/** Notification the server sends after loading the model and after each completion. */
export const STATUS_NOTIFICATION = 'codecomplete/status';

/** restarting: the model runtime crashed and its process is being restarted. */
export type ServerState = 'loading' | 'ready' | 'error' | 'restarting';

export interface StatusParams {
  state: ServerState;
  message?: string;
  latencyMs?: number;
}

/** Validate an incoming status notification; garbage yields undefined. */
export function parseStatus(params: unknown): StatusParams | undefined {
  if (params === null || typeof params !== 'object') return undefined;
  const { state, message, latencyMs } = params as Record<string, unknown>;
  if (state !== 'loading' && state !== 'ready' && state !== 'error' && state !== 'restarting') return undefined;
  return {
    state,
    message: typeof message === 'string' ? message : undefined,
    latencyMs: typeof latencyMs === 'number' && Number.isFinite(latencyMs) ? latencyMs : undefined,
  };
}
