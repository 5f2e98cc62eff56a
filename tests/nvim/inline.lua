-- Headless check of the ghost-text path (Neovim >= 0.12, vim.lsp.inline_completion): our Lua
-- module enables inline completion; entering insert mode after "    pri" shows the
-- suggestion as an extmark, and <Tab> (vim.lsp.inline_completion.get()) inserts it.
-- Environment: CODECOMPLETE_NVIM_CMD (JSON list), CODECOMPLETE_NVIM_FILE, CODECOMPLETE_NVIM_OUT.
local out = { steps = {} }
local function finish(err)
  out.error = err
  local f = io.open(os.getenv("CODECOMPLETE_NVIM_OUT"), "w")
  f:write(vim.fn.json_encode(out))
  f:close()
  vim.cmd("qall!")
end
local function step(name) table.insert(out.steps, name) end

local ok, err = pcall(function()
  local v = vim.version()
  out.version = string.format("%d.%d.%d", v.major, v.minor, v.patch)
  out.has_inline_completion = vim.lsp.inline_completion ~= nil
  local ready = false
  vim.lsp.handlers["codecomplete/status"] = function(_, result)
    if result and result.state == "ready" then ready = true end
  end
  require("codecomplete").setup({
    cmd = vim.fn.json_decode(os.getenv("CODECOMPLETE_NVIM_CMD")),
    settings = { candidates = 3, maxTokens = 8 },
  })
  vim.cmd("edit " .. vim.fn.fnameescape(os.getenv("CODECOMPLETE_NVIM_FILE")))
  vim.bo.filetype = "python"
  if not vim.wait(30000, function() return ready end, 50) then error("server not ready") end
  step("ready")
  out.offset_encoding = vim.lsp.get_client_by_id(require("codecomplete").client_id).offset_encoding
  out.enabled = vim.lsp.inline_completion.is_enabled({ bufnr = 0 })
end)
if not ok then finish(tostring(err)) return end

local ns = vim.api.nvim_get_namespaces()["nvim.lsp.inline_completion"]
vim.api.nvim_win_set_cursor(0, { 2, #vim.fn.getline(2) })
vim.api.nvim_feedkeys("A", "n", false) -- insert mode after "    pri": InsertEnter asks for a suggestion
local tries = 0
local function wait_ghost()
  tries = tries + 1
  ns = ns or vim.api.nvim_get_namespaces()["nvim.lsp.inline_completion"]
  local marks = ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}
  if #marks > 0 then
    local mark = marks[1]
    local text = ""
    for _, chunk in ipairs(mark[4].virt_text or {}) do text = text .. chunk[1] end
    out.ghost = { row = mark[2], col = mark[3], text = text }
    step("ghost")
    vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes("<Tab>", true, false, true), "m", false)
    vim.defer_fn(function()
      out.line = vim.api.nvim_get_current_line()
      out.cursor = vim.api.nvim_win_get_cursor(0)
      finish(nil)
    end, 300)
  elseif tries > 300 then
    out.mode = vim.fn.mode()
    finish("no ghost text appeared")
  else
    vim.defer_fn(wait_ghost, 50)
  end
end
vim.defer_fn(wait_ghost, 100)
