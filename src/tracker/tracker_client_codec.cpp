// Forwards the client's encode calls to the wire codec (see tracker_client_codec.hpp for why this
// file exists).
#include "tracker/tracker_client_codec.hpp"

#include "tracker/codec.hpp"

#include <steward/error.hpp>

#include <cstring>

namespace steward::detail {

std::error_code tracker_canonical_name(resource_type type, std::string_view name, char* out,
                                       std::string_view& result) noexcept {
    if (type == resource_type::noop) return std::make_error_code(std::errc::invalid_argument);
    if (tracker::canonical_name(type, name, out, result) != tracker::decode_error::none)
        return std::make_error_code(std::errc::invalid_argument);
    return {};
}

std::error_code tracker_encode(bool register_it, resource_type type, std::string_view name, char* out,
                               std::size_t& size) noexcept {
    tracker::encoded_message message;
    const auto cmd =
        register_it ? tracker::command::register_resource : tracker::command::unregister_resource;
    size = 0;
    if (auto ec = tracker::encode_message(cmd, type, name, message)) return ec;
    std::memcpy(out, message.bytes.data(), message.size);
    size = message.size;
    return {};
}

}  // namespace steward::detail
