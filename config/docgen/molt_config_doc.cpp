// molt_config_doc: writes the config reference at build time, so that the molt.yaml(5) man
// page and docs/config.md come from the loader's own key table. Its own tiny main, apart
// from molt's command line, so that the build never needs molt itself to run.
//
//   molt_config_doc markdown          docs/config.md
//   molt_config_doc roff VERSION      molt.yaml(5)
//
// Exit codes: 0 written, 2 usage.
#include <iostream>
#include <string_view>

#include "config/config.hpp"

int main(int argc, char** argv) {
    const std::string_view format = argc > 1 ? argv[1] : "";
    if (format == "markdown" && argc == 2) {
        std::cout << molt::config::config_reference_markdown();
        return 0;
    }
    if (format == "roff" && argc == 3) {
        std::cout << molt::config::config_reference_roff(argv[2]);
        return 0;
    }
    std::cerr << "usage: molt_config_doc markdown | molt_config_doc roff VERSION\n";
    return 2;
}
