#pragma once
// A fetch on a connection of its own (fetch_options::pooled == false): connect, quick connect
// (or the full handshake + HELLO when the server runs as another uid), one request, CONFIRM,
// close. No state on the execution context.

#include <steward/fetch.hpp>

namespace steward::detail {

void start_dedicated_fetch(const asio::any_io_executor& executor, const share_id& id, const authkey& key,
                           const fetch_options& options, fetch_handler handler);

}  // namespace steward::detail
