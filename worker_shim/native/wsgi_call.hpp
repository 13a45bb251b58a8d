// The Python objects a request sees (start_response, wsgi.input) and their type specs.
#pragma once

#include "engine.hpp"

namespace molt::native {

// Heap types made from these specs in the module's exec slot (see module.cpp).
extern PyType_Spec start_response_spec;
extern PyType_Spec input_spec;

}  // namespace molt::native
