# Compiles one compile_fail case and checks its diagnostics:
#   cmake -DCXX=<compiler> -DSOURCE=<file.cpp> -DINCLUDE=<dir> -DMESSAGE=<regex> -DTYPE=<regex>
#         -P check.cmake
# The compilation must fail with exactly one "error:" (one static_assert per mistake, nothing
# cascading after it), whose text matches MESSAGE, and the output must name the offending type
# (TYPE: the variable template of the failed condition with the type as its argument).
foreach(v CXX SOURCE INCLUDE MESSAGE TYPE)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "check.cmake: ${v} is not set")
  endif()
endforeach()
execute_process(
  COMMAND ${CXX} -std=c++20 -fsyntax-only -I${INCLUDE} ${SOURCE}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
set(all "${out}${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled with ${CXX}, but must not")
endif()
string(REGEX MATCHALL "error:" errors "${all}")
list(LENGTH errors n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "${CXX}: expected exactly 1 error, got ${n}:\n${all}")
endif()
if(NOT all MATCHES "${MESSAGE}")
  message(FATAL_ERROR "${CXX}: the error does not say \"${MESSAGE}\":\n${all}")
endif()
if(NOT all MATCHES "${TYPE}")
  message(FATAL_ERROR "${CXX}: the output does not name the type (${TYPE}):\n${all}")
endif()
message(STATUS "${CXX}: one error, message and type as expected")
