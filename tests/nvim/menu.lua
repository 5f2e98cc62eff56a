-- Headless check of the completion-menu path (Neovim 0.7-0.11): our Lua module starts the
-- server, textDocument/completion returns our items, and typing opens the menu (autotrigger
-- -> vim.lsp.omnifunc -> complete()) whose first entry inserts the candidate.
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
  local ready = false
  vim.lsp.handlers["codecomplete/status"] = function(_, result)
    if result and result.state == "ready" then ready = true end
  end
  require("codecomplete").setup({
    cmd = vim.fn.json_decode(os.getenv("CODECOMPLETE_NVIM_CMD")),
    settings = { candidates = 3, maxTokens = 8 },
    inline = false,
    trigger_delay_ms = 50,
  })
  vim.cmd("edit " .. vim.fn.fnameescape(os.getenv("CODECOMPLETE_NVIM_FILE")))
  vim.bo.filetype = "python"
  if not vim.wait(30000, function() return ready end, 50) then error("server not ready") end
  step("ready")
  out.omnifunc = vim.bo.omnifunc

  vim.api.nvim_win_set_cursor(0, { 2, #vim.fn.getline(2) })
  local client = vim.lsp.get_client_by_id(require("codecomplete").client_id)
  out.offset_encoding = client.offset_encoding
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  local responses = vim.lsp.buf_request_sync(0, "textDocument/completion", params, 10000)
  local items = {}
  for _, response in pairs(responses or {}) do
    for _, item in ipairs((response.result or {}).items or response.result or {}) do
      table.insert(items, { label = item.label, newText = item.textEdit and item.textEdit.newText,
                            start = item.textEdit and item.textEdit.range.start.character })
    end
    -- What the 0.7 omnifunc keeps after filtering by the typed prefix "pri":
    local to_items = vim.lsp.util.text_document_completion_list_to_complete_items
    if to_items then
      out.menu_words = {}
      for _, m in ipairs(to_items(response.result, "pri")) do
        table.insert(out.menu_words, m.word)
      end
    end
  end
  out.items = items
  step("requested")
end)
if not ok then finish(tostring(err)) return end

-- Now as a user: append "n" to "    pri" in insert mode, let the menu open, take its first entry.
vim.api.nvim_feedkeys("An", "n", false)
local tries = 0
local function wait_menu()
  tries = tries + 1
  local info = vim.fn.complete_info({ "items", "pum_visible", "mode" })
  if #(info.items or {}) > 0 then
    out.popup = {}
    for _, it in ipairs(info.items) do table.insert(out.popup, it.word) end
    step("menu")
    vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes("<C-n><C-y>", true, false, true), "n", false)
    vim.defer_fn(function()
      out.line = vim.api.nvim_get_current_line()
      finish(nil)
    end, 300)
  elseif tries > 200 then
    out.line = vim.api.nvim_get_current_line()
    out.mode = vim.fn.mode()
    finish("the menu never opened")
  else
    vim.defer_fn(wait_menu, 50)
  end
end
vim.defer_fn(wait_menu, 100)
