#include "sharer/sharer_wire.hpp"

#include <asio/error.hpp>

namespace steward::detail::wire {

std::error_code normalize(std::error_code ec) noexcept {
    if (ec && ec.category() == asio::error::get_system_category() && ec != asio::error::operation_aborted)
        return errno_code(ec.value());
    return ec;
}

}  // namespace steward::detail::wire
