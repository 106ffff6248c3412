#include "tracker/registry_change_log.hpp"

namespace steward::detail::tracking {

void registry_change_log::apply_one(registry& set, bool insert, resource_type type, std::string_view name) {
    if (insert) {
        (void)set.insert(type, name);
    } else if (set.size() != 0 && set.erase(type, name)) {  // nothing to look up in an empty set
        (void)set.compact();  // only when dead entries outnumber live ones (and 4096)
    }
}

void registry_change_log::apply(registry& set) {
    while (applied_ < used_) {
        const char* p = bytes_.data() + applied_;
        const auto tag = static_cast<unsigned char>(p[0]);
        const std::size_t size =
            static_cast<unsigned char>(p[1]) | (std::size_t{static_cast<unsigned char>(p[2])} << 8);
        apply_one(set, (tag & 1) != 0, static_cast<resource_type>(tag >> 1),
                  std::string_view(p + header_size, size));
        applied_ += header_size + size;
    }
    clear();
}

}  // namespace steward::detail::tracking
