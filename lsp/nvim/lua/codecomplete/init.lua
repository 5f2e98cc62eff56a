-- codecomplete for Neovim: starts `codecomplete-lsp` and shows its completions.
--
--   Neovim >= 0.12  ghost text through vim.lsp.inline_completion (accept with <Tab>,
--                   cycle with <M-]> / <M-[>)
--   Neovim 0.7-0.11 the completion menu: 'omnifunc' is vim.lsp.omnifunc (<C-x><C-o>),
--                   and with autotrigger the menu opens by itself while you type
--
-- Setup (the folder holding this file's lua/ directory must be on 'runtimepath';
-- `codecomplete-lsp --nvim-runtime` prints it):
--
--   require("codecomplete").setup({ settings = { candidates = 4, maxTokens = 48 } })
--
-- The team service instead of the local model (model, runtime and device are then the
-- service's; keep the key out of shared dotfiles, e.g. read it from the environment):
--
--   require("codecomplete").setup({ settings = {
--     server = "https://complete.example.com", apiKey = os.getenv("CODECOMPLETE_API_KEY") } })

local M = {}
local uv = vim.uv or vim.loop

M.defaults = {
  cmd = { "codecomplete-lsp" },
  filetypes = nil, -- nil: every buffer with a filetype; or a list such as { "python", "lua" }
  -- the `codecomplete` section: model, runtime, device, candidates, maxTokens, deadlineMs, multiline,
  -- enable, isolate (the model in a child process, default true), server (team service URL), apiKey
  settings = {},
  inline = nil, -- nil: ghost text where vim.lsp.inline_completion exists (0.12+), else the menu
  accept_key = "<Tab>", -- ghost text: accept (the key keeps its meaning when there is nothing to accept)
  next_key = "<M-]>",
  prev_key = "<M-[>",
  autotrigger = true, -- menu: open it while typing (sets completeopt=menuone,noinsert,noselect)
  trigger_delay_ms = 150,
}

M.config = vim.deepcopy(M.defaults)
M.client_id = nil

local function has_inline()
  return vim.lsp.inline_completion ~= nil and vim.lsp.inline_completion.enable ~= nil
end

local function use_inline()
  if M.config.inline == nil then
    return has_inline()
  end
  return M.config.inline and has_inline()
end

-- Open the menu (through vim.lsp.omnifunc, which calls complete()) after a pause in typing.
local timer = nil
local function schedule_menu(bufnr)
  if timer then
    timer:stop()
    timer:close()
  end
  timer = uv.new_timer()
  timer:start(M.config.trigger_delay_ms, 0, vim.schedule_wrap(function()
    if timer then
      timer:stop()
      timer:close()
      timer = nil
    end
    if vim.api.nvim_get_current_buf() ~= bufnr or vim.fn.mode() ~= "i" or vim.fn.pumvisible() == 1 then
      return
    end
    local col = vim.api.nvim_win_get_cursor(0)[2]
    local before = vim.api.nvim_get_current_line():sub(1, col)
    if before:match("[%w_%.%(]$") then
      vim.lsp.omnifunc(1, "")
    end
  end))
end

local function on_attach(client, bufnr)
  if use_inline() then
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
    vim.keymap.set("i", M.config.accept_key, function()
      if not vim.lsp.inline_completion.get() then
        return vim.api.nvim_replace_termcodes(M.config.accept_key, true, false, true)
      end
    end, { buffer = bufnr, expr = true, desc = "codecomplete: accept the suggestion" })
    vim.keymap.set("i", M.config.next_key, function()
      vim.lsp.inline_completion.select({ count = 1 })
    end, { buffer = bufnr, desc = "codecomplete: next suggestion" })
    vim.keymap.set("i", M.config.prev_key, function()
      vim.lsp.inline_completion.select({ count = -1 })
    end, { buffer = bufnr, desc = "codecomplete: previous suggestion" })
    return
  end
  vim.bo[bufnr].omnifunc = "v:lua.vim.lsp.omnifunc"
  if M.config.autotrigger then
    vim.o.completeopt = "menuone,noinsert,noselect"
    vim.api.nvim_create_autocmd("TextChangedI", {
      buffer = bufnr,
      group = vim.api.nvim_create_augroup("codecomplete_menu_" .. bufnr, { clear = true }),
      callback = function()
        schedule_menu(bufnr)
      end,
    })
  end
end

local function client_config()
  local settings = { codecomplete = M.config.settings }
  return {
    name = "codecomplete",
    cmd = M.config.cmd,
    root_dir = vim.fn.getcwd(),
    init_options = settings,
    settings = settings,
    on_attach = on_attach,
  }
end

--- Attach codecomplete to a buffer (starts the server on first use).
function M.attach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  if vim.lsp.start then -- 0.8+: reuses the running client with the same name and root
    M.client_id = vim.lsp.start(client_config(), { bufnr = bufnr })
    return M.client_id
  end
  local client = M.client_id and vim.lsp.get_client_by_id(M.client_id)
  if not client or client.is_stopped() then
    M.client_id = vim.lsp.start_client(client_config())
  end
  if M.client_id then
    vim.lsp.buf_attach_client(bufnr, M.client_id)
  end
  return M.client_id
end

--- Change settings while running (same keys as setup's `settings`).
function M.configure(settings)
  M.config.settings = vim.tbl_deep_extend("force", M.config.settings, settings or {})
  local client = M.client_id and vim.lsp.get_client_by_id(M.client_id)
  if client then
    local params = { settings = { codecomplete = M.config.settings } }
    if vim.fn.has("nvim-0.11") == 1 then
      client:notify("workspace/didChangeConfiguration", params)
    else
      client.notify("workspace/didChangeConfiguration", params)
    end
  end
end

local function wanted(bufnr)
  local ft = vim.bo[bufnr].filetype
  if vim.bo[bufnr].buftype ~= "" or ft == "" then
    return false
  end
  return M.config.filetypes == nil or vim.tbl_contains(M.config.filetypes, ft)
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  local group = vim.api.nvim_create_augroup("codecomplete", { clear = true })
  vim.api.nvim_create_autocmd("FileType", {
    group = group,
    pattern = M.config.filetypes or "*",
    callback = function(args)
      if wanted(args.buf) then
        M.attach(args.buf)
      end
    end,
  })
  -- Buffers opened before setup (lazy-loading plugin managers) get attached too.
  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr) and wanted(bufnr) then
      M.attach(bufnr)
    end
  end
end

return M
